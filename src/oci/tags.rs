//! Which tags of a whole repository an image backup takes: a tag policy, as regsync's and
//! skopeo sync's users write them. One options struct serves the command line
//! (`tresor backup image --tags ... --exclude-tags ... --semver ... --newest N`) and the agent
//! (`[jobs.NAME.tag_policy]`), so the two cannot disagree.
//!
//! The rules apply in this order: `tags` keeps the tags its regular expression matches,
//! `exclude_tags` drops those its own matches; `semver` keeps the tags that are versions within
//! the range; `newest` keeps the N highest versions. A tag is a version when it reads as one,
//! with an optional `v` and one to three numbers (`v1`, `1.2`, `v2.3.1`, `2.0.0-rc.1`); with
//! `semver` or `newest`, other tags (`latest`, `main`, `nightly-x`) are left out. Versions are
//! ordered as semantic versions (`1.10` after `1.9`, a pre-release before its release); a
//! range follows Cargo's rules (`>=1.2, <2`, `^1.4`, `~2.1`), so pre-releases match only a
//! range that names one.

use regex::Regex;
use serde::Deserialize;

use crate::error::{Error, Result};

/// A tag policy, as given (see the module docs).
#[derive(Clone, Debug, Default, clap::Args, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TagPolicy {
    /// With a whole repository: only tags matching this regular expression.
    #[arg(long = "tags", value_name = "REGEX")]
    #[serde(default)]
    pub tags: Option<String>,
    /// With a whole repository: leave out tags matching this regular expression.
    #[arg(long, value_name = "REGEX")]
    #[serde(default)]
    pub exclude_tags: Option<String>,
    /// With a whole repository: only tags that are versions (v1.2, 1.2.3, 2.0.0-rc.1) in this
    /// range (">=1.2, <2", "^1.4", "~2.1").
    #[arg(long, value_name = "RANGE")]
    #[serde(default)]
    pub semver: Option<String>,
    /// With a whole repository: only the N highest versions (after the other rules).
    #[arg(long, value_name = "N")]
    #[serde(default)]
    pub newest: Option<usize>,
}

/// A [`TagPolicy`] checked and ready to select.
#[derive(Clone, Debug, Default)]
pub struct TagSelector {
    include: Option<Regex>,
    exclude: Option<Regex>,
    range: Option<semver::VersionReq>,
    newest: Option<usize>,
}

impl TagPolicy {
    /// Checks the policy.
    ///
    /// # Errors
    /// [`Error::Config`] naming the rule that does not parse, or `newest = 0`.
    pub fn compile(&self) -> Result<TagSelector> {
        let regex = |name: &str, re: &Option<String>| {
            re.as_deref()
                .map(Regex::new)
                .transpose()
                .map_err(|e| Error::Config(format!("tag policy: {name}: {e}")))
        };
        let range = self
            .semver
            .as_deref()
            .map(semver::VersionReq::parse)
            .transpose()
            .map_err(|e| {
                Error::Config(format!(
                    "tag policy: semver {:?}: {e} (a range such as \">=1.2, <2\")",
                    self.semver.as_deref().unwrap_or_default()
                ))
            })?;
        if self.newest == Some(0) {
            return Err(Error::Config(
                "tag policy: newest must be at least 1".into(),
            ));
        }
        Ok(TagSelector {
            include: regex("tags", &self.tags)?,
            exclude: regex("exclude_tags", &self.exclude_tags)?,
            range,
            newest: self.newest,
        })
    }
}

impl TagSelector {
    /// The tags of `tags` the policy takes: in the order given, or with `newest`, highest
    /// version first.
    pub fn select(&self, tags: Vec<String>) -> Vec<String> {
        let mut kept: Vec<(Option<semver::Version>, String)> = tags
            .into_iter()
            .filter(|t| self.include.as_ref().is_none_or(|re| re.is_match(t)))
            .filter(|t| self.exclude.as_ref().is_none_or(|re| !re.is_match(t)))
            .map(|t| (version(&t), t))
            .collect();
        if self.range.is_none() && self.newest.is_none() {
            return kept.into_iter().map(|(_, t)| t).collect();
        }
        kept.retain(|(v, _)| {
            v.as_ref()
                .is_some_and(|v| self.range.as_ref().is_none_or(|r| r.matches(v)))
        });
        if let Some(n) = self.newest {
            // Highest first; two tags of one version (`v1.2` and `1.2.0`) by name.
            kept.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.cmp(&b.1)));
            kept.truncate(n);
        }
        kept.into_iter().map(|(_, t)| t).collect()
    }
}

/// The version a tag reads as, if any: an optional `v`, one to three numbers, then an optional
/// pre-release and build as semantic versioning writes them.
fn version(tag: &str) -> Option<semver::Version> {
    let plain = tag.strip_prefix('v').unwrap_or(tag);
    let end = plain.find(['-', '+']).unwrap_or(plain.len());
    let (numbers, rest) = plain.split_at(end);
    let parts: Vec<&str> = numbers.split('.').collect();
    if parts.is_empty()
        || parts.len() > 3
        || parts
            .iter()
            .any(|p| p.is_empty() || !p.bytes().all(|b| b.is_ascii_digit()))
    {
        return None;
    }
    let padded = [parts.as_slice(), &["0"; 3][..3 - parts.len()]].concat();
    semver::Version::parse(&format!("{}{rest}", padded.join("."))).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn select(policy: TagPolicy, tags: &[&str]) -> Vec<String> {
        policy
            .compile()
            .unwrap()
            .select(tags.iter().map(|t| t.to_string()).collect())
    }

    const TAGS: &[&str] = &[
        "latest",
        "v1.0",
        "v1.1",
        "v1.9",
        "v1.10",
        "v2.0-rc.1",
        "v2.0",
        "v2.3",
        "main",
        "v2.3-debug",
        "2.1.0",
        "nightly-2026",
        "v01.x",
    ];

    #[test]
    fn ranges_newest_and_excludes_select_versions() {
        let all = select(TagPolicy::default(), TAGS);
        assert_eq!(all.len(), TAGS.len());
        let range = TagPolicy {
            semver: Some(">=1.1, <2".into()),
            ..TagPolicy::default()
        };
        assert_eq!(select(range, TAGS), ["v1.1", "v1.9", "v1.10"]);
        let newest = TagPolicy {
            newest: Some(3),
            exclude_tags: Some("-debug$".into()),
            ..TagPolicy::default()
        };
        assert_eq!(select(newest, TAGS), ["v2.3", "2.1.0", "v2.0"]);
        let pre = TagPolicy {
            semver: Some(">=2.0.0-rc.1, <2.0.1".into()),
            ..TagPolicy::default()
        };
        assert_eq!(select(pre, TAGS), ["v2.0-rc.1", "v2.0"]);
        let regex = TagPolicy {
            tags: Some("^v1\\.".into()),
            newest: Some(1),
            ..TagPolicy::default()
        };
        assert_eq!(select(regex, TAGS), ["v1.10"]);
    }

    #[test]
    fn a_bad_rule_is_named() {
        for (policy, named) in [
            (
                TagPolicy {
                    semver: Some(">=x".into()),
                    ..TagPolicy::default()
                },
                "semver",
            ),
            (
                TagPolicy {
                    tags: Some("(".into()),
                    ..TagPolicy::default()
                },
                "tags",
            ),
            (
                TagPolicy {
                    exclude_tags: Some("[".into()),
                    ..TagPolicy::default()
                },
                "exclude_tags",
            ),
            (
                TagPolicy {
                    newest: Some(0),
                    ..TagPolicy::default()
                },
                "newest",
            ),
        ] {
            let e = policy.compile().unwrap_err().to_string();
            assert!(e.contains(named), "{e}");
        }
    }
}
