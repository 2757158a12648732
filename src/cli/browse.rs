//! Looking into volume tree snapshots without restoring them: `ls`, `find`, `dump`, `diff`
//! (front ends of `tresor::volume::browse`).

use clap::Args;
use serde_json::json;
use std::process::ExitCode;
use tresor::catalog::{Entry, EntryKind};
use tresor::snapshot::{self, Kind};
use tresor::volume::browse;

use super::*;

#[derive(Args)]
pub(crate) struct LsArgs {
    #[command(flatten)]
    pub(crate) out: JsonFlag,
    /// Snapshot id, unique prefix, or name (its newest snapshot): a volume tree's entries, or an
    /// image's manifests and blobs.
    pub(crate) snapshot: String,
    /// Only this path of a tree and what is below it (relative, as stored).
    pub(crate) path: Option<String>,
}

pub(crate) async fn ls(g: &Global, args: &LsArgs) -> anyhow::Result<ExitCode> {
    let repo = open(g).await?;
    let snap = snapshot::resolve(&repo, &args.snapshot, None).await?;
    let rt = tokio::runtime::Handle::current();
    if snap.snapshot.kind != Kind::Image {
        let (json, path) = (g.json, args.path.clone());
        tokio::task::spawn_blocking(move || ls_tree(&repo, &rt, &snap, path.as_deref(), json))
            .await??;
        return Ok(ExitCode::SUCCESS);
    }
    if args.path.is_some() {
        anyhow::bail!(
            "an image snapshot has no paths; `tresor ls SNAP` lists its manifests and blobs"
        );
    }
    let record =
        tokio::task::spawn_blocking(move || tresor::oci::load_record(&repo, &rt, &snap)).await??;
    if g.json {
        let manifests: Vec<_> = record
            .manifests
            .iter()
            .map(|m| json!({"digest": m.digest, "media_type": m.media_type, "size": m.raw.len(), "role": m.role, "tags": m.tags}))
            .collect();
        let blobs: Vec<_> = record
            .blobs
            .iter()
            .map(|b| json!({"digest": b.digest, "size": b.size, "chunks": b.refs.len()}))
            .collect();
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({
                "repository": record.repository, "tag": record.tag, "digest": record.digest,
                "platforms": record.platforms, "manifests": manifests, "blobs": blobs,
            }))?
        );
    } else {
        println!(
            "{}:{} {}",
            record.repository,
            record.tag.as_deref().unwrap_or("-"),
            record.digest
        );
        for m in &record.manifests {
            println!(
                "manifest {:<8} {} {:>10} {} {}",
                format!("{:?}", m.role).to_lowercase(),
                m.digest,
                m.raw.len(),
                m.media_type,
                m.tags.join(",")
            );
        }
        for b in &record.blobs {
            println!("blob              {} {:>10}", b.digest, b.size);
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Prints the entries of a tree snapshot under `path`: `ls -l` lines, or with `json` a JSON
/// array with one entry per line, written as the catalog is read.
fn ls_tree(
    repo: &std::sync::Arc<tresor::repository::Repository>,
    rt: &tokio::runtime::Handle,
    snap: &tresor::snapshot::Listed,
    path: Option<&str>,
    json: bool,
) -> tresor::Result<()> {
    let mut out = Streamed::new(json);
    browse::entries(repo, rt, snap, path, |e| {
        if json {
            out.item(&entry_json(&e).to_string())
        } else {
            out.item(&entry_line(&e))
        }
    })?;
    out.finish("")
}

/// Output written as it comes: text lines, or a JSON array with one item per line. A closed
/// pipe (`| head`) is the reader's choice, not a failure.
struct Streamed {
    out: std::io::BufWriter<std::io::StdoutLock<'static>>,
    json: bool,
    items: u64,
    failed: Option<std::io::Error>,
}

impl Streamed {
    fn new(json: bool) -> Streamed {
        Streamed {
            out: std::io::BufWriter::new(std::io::stdout().lock()),
            json,
            items: 0,
            failed: None,
        }
    }

    /// Writes one item (a line of text without its newline, or a JSON value); `false` once
    /// writing failed, so a walk feeding it stops.
    fn item(&mut self, item: &str) -> bool {
        use std::io::Write;
        let sep = match (self.json, self.items) {
            (false, _) => "",
            (true, 0) => "[\n",
            (true, _) => ",\n",
        };
        self.items += 1;
        let written = write!(self.out, "{sep}{item}");
        let written = written.and_then(|()| {
            if self.json {
                Ok(())
            } else {
                self.out.write_all(b"\n")
            }
        });
        if let Err(e) = written {
            self.failed = Some(e);
        }
        self.failed.is_none()
    }

    /// Ends the array (or writes `trailer`, a text summary) and flushes.
    fn finish(mut self, trailer: &str) -> tresor::Result<()> {
        use std::io::Write;
        let end = match (self.json, self.items) {
            (false, _) => trailer,
            (true, 0) => "[]\n",
            (true, _) => "\n]\n",
        };
        let written = self
            .out
            .write_all(end.as_bytes())
            .and_then(|()| self.out.flush());
        match self.failed.take().map_or(written, Err) {
            Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
                Err(tresor::Error::io("(stdout)", e))
            }
            _ => Ok(()),
        }
    }
}

fn kind_name(kind: EntryKind) -> (&'static str, char) {
    match kind {
        EntryKind::Dir => ("dir", 'd'),
        EntryKind::File => ("file", '-'),
        EntryKind::Symlink => ("symlink", 'l'),
        EntryKind::Hardlink => ("hardlink", 'h'),
        EntryKind::Fifo => ("fifo", 'p'),
        EntryKind::Socket => ("socket", 's'),
        EntryKind::CharDevice => ("char", 'c'),
        EntryKind::BlockDevice => ("block", 'b'),
    }
}

fn mtime(e: &Entry) -> chrono::DateTime<chrono::Utc> {
    chrono::DateTime::from_timestamp(
        e.mtime_ns.div_euclid(1_000_000_000),
        e.mtime_ns.rem_euclid(1_000_000_000) as u32,
    )
    .unwrap_or_default()
}

/// An entry as `ls --json` and `find --json` give it.
fn entry_json(e: &Entry) -> serde_json::Value {
    json!({
        "path": e.display_path(), "type": kind_name(e.kind).0, "mode": format!("{:o}", e.mode),
        "uid": e.uid, "gid": e.gid, "user": e.user, "group": e.group, "size": e.size,
        "mtime": mtime(e).to_rfc3339(), "link": e.link.as_deref().map(String::from_utf8_lossy),
    })
}

/// An entry as an `ls -l` line.
fn entry_line(e: &Entry) -> String {
    let owner = e.user.clone().unwrap_or_else(|| e.uid.to_string());
    let group = e.group.clone().unwrap_or_else(|| e.gid.to_string());
    let link = e.link.as_deref().map(String::from_utf8_lossy);
    let arrow = match (&e.kind, &link) {
        (EntryKind::Symlink, Some(l)) => format!(" -> {l}"),
        (EntryKind::Hardlink, Some(l)) => format!(" => {l}"),
        _ => String::new(),
    };
    format!(
        "{}{} {owner}/{group} {:>12} {} {}{arrow}",
        kind_name(e.kind).1,
        permissions(e.mode),
        e.size,
        mtime(e).format("%Y-%m-%d %H:%M:%S"),
        e.display_path()
    )
}

#[derive(Args)]
pub(crate) struct FindArgs {
    #[command(flatten)]
    pub(crate) out: JsonFlag,
    /// A shell pattern: `*`, `?`, `[...]` within a name, `**` across directories. Without a `/`
    /// it matches an entry's name, with one its whole path (relative, as `tresor ls` lists it).
    pub(crate) pattern: String,
    #[command(flatten)]
    pub(crate) filter: FilterArgs,
    /// Only the newest snapshot of each host and name.
    #[arg(long)]
    pub(crate) latest: bool,
}

/// `tresor find`: the entries whose name (or path) matches, in every volume tree snapshot the
/// filter selects (newest first), as `ls -l` lines prefixed with the snapshot, or a JSON array
/// of `ls --json` objects with `snapshot`, `name` and `time`.
pub(crate) async fn find(g: &Global, args: &FindArgs) -> anyhow::Result<ExitCode> {
    let pattern = browse::Pattern::new(&args.pattern)?;
    let repo = open(g).await?;
    let mut snaps: Vec<_> = snapshot::list(&repo, &args.filter.to_filter())
        .await?
        .into_iter()
        .filter(|s| s.snapshot.root_format == tresor::snapshot::RootFormat::Tree)
        .collect();
    snaps.sort_by_key(|s| std::cmp::Reverse(s.snapshot.time));
    if args.latest {
        let mut seen = std::collections::HashSet::new();
        snaps.retain(|s| seen.insert((s.snapshot.host.clone(), s.snapshot.name.clone())));
    }
    let (rt, json) = (tokio::runtime::Handle::current(), g.json);
    tokio::task::spawn_blocking(move || -> tresor::Result<()> {
        let mut out = Streamed::new(json);
        let mut found = 0;
        for snap in &snaps {
            browse::find(&repo, &rt, snap, &pattern, |e| {
                found += 1;
                if json {
                    let mut item = entry_json(&e);
                    item["snapshot"] = json!(snap.id);
                    item["name"] = json!(snap.snapshot.name);
                    item["time"] = json!(snap.snapshot.time);
                    out.item(&item.to_string())
                } else {
                    out.item(&format!("{} {}", &snap.id[..8], entry_line(&e)))
                }
            })?;
        }
        let trailer = format!("{found} entries in {} snapshots\n", snaps.len());
        out.finish(&trailer)
    })
    .await??;
    Ok(ExitCode::SUCCESS)
}

/// `rwxr-xr-x` for the permission bits of `mode`, with setuid, setgid and sticky.
fn permissions(mode: u32) -> String {
    let mut s: Vec<u8> = b"rwxrwxrwx".to_vec();
    for (i, c) in s.iter_mut().enumerate() {
        if mode & (0o400 >> i) == 0 {
            *c = b'-';
        }
    }
    for (bit, at, lower, upper) in [
        (0o4000, 2, b's', b'S'),
        (0o2000, 5, b's', b'S'),
        (0o1000, 8, b't', b'T'),
    ] {
        if mode & bit != 0 {
            s[at] = if s[at] == b'x' { lower } else { upper };
        }
    }
    String::from_utf8(s).expect("ascii")
}

#[derive(Args)]
pub(crate) struct DumpArgs {
    /// Snapshot id, unique prefix, or name (its newest snapshot).
    pub(crate) snapshot: String,
    /// A path in the tree (relative, as `tresor ls` lists it): a file's bytes, or a directory
    /// as a tar stream [default: the whole tree, as a tar stream].
    pub(crate) path: Option<String>,
    /// A tar stream even of a single file.
    #[arg(long)]
    pub(crate) tar: bool,
    /// Keep setuid/setgid bits and device nodes in a tar stream from an unencrypted
    /// repository (as `restore volume --restore-special`; encrypted ones keep them always).
    #[arg(long)]
    pub(crate) restore_special: bool,
}

/// `tresor dump`: a file's bytes, or a directory as a tar stream, on stdout (`> FILE`, or a
/// pipe; never a terminal).
pub(crate) async fn dump(g: &Global, args: &DumpArgs) -> anyhow::Result<ExitCode> {
    use std::io::IsTerminal;
    if std::io::stdout().is_terminal() {
        anyhow::bail!("tresor dump writes raw bytes: redirect its output to a file or a pipe");
    }
    let repo = open(g).await?;
    let snap = snapshot::resolve(&repo, &args.snapshot, None).await?;
    let special = args.restore_special || repo.is_encrypted();
    let (rt, path, force_tar, quiet) = (
        tokio::runtime::Handle::current(),
        args.path.clone(),
        args.tar,
        g.quiet,
    );
    tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
        let out = std::io::BufWriter::new(std::io::stdout().lock());
        let file = match &path {
            Some(p) if !force_tar => matches!(
                browse::kind_of(&repo, &rt, &snap, p)?,
                EntryKind::File | EntryKind::Hardlink
            ),
            _ => false,
        };
        if file {
            let mut out = out;
            browse::dump(&repo, &rt, &snap, path.as_deref().unwrap_or_default(), &mut out)?;
            std::io::Write::flush(&mut out)?;
            return Ok(());
        }
        let summary = browse::dump_tar(&repo, &rt, &snap, path.as_deref(), special, out)?;
        for skipped in &summary.skipped {
            tracing::warn!("{skipped}: left out of the tar stream (a socket, or a device node without --restore-special)");
        }
        if !quiet {
            eprintln!(
                "tar stream: {} entries, {} of file data",
                summary.entries,
                human_bytes(summary.bytes)
            );
        }
        Ok(())
    })
    .await??;
    Ok(ExitCode::SUCCESS)
}

#[derive(Args)]
pub(crate) struct DiffArgs {
    #[command(flatten)]
    pub(crate) out: JsonFlag,
    /// The older snapshot: id, unique prefix, or name (its newest snapshot).
    pub(crate) old: String,
    /// The newer snapshot.
    pub(crate) new: String,
}

/// `tresor diff`: one line per changed entry (`+` added, `-` removed, `M` content modified,
/// `U` metadata only, with what changed) and a count; with `--json` an array, one change per
/// line, written as the catalogs are read.
pub(crate) async fn diff(g: &Global, args: &DiffArgs) -> anyhow::Result<ExitCode> {
    use browse::ChangeKind;
    let repo = open(g).await?;
    let old = snapshot::resolve(&repo, &args.old, None).await?;
    let new = snapshot::resolve(&repo, &args.new, None).await?;
    let (rt, json) = (tokio::runtime::Handle::current(), g.json);
    tokio::task::spawn_blocking(move || -> tresor::Result<()> {
        let mut out = Streamed::new(json);
        let mut counts = [0u64; 3];
        browse::diff(&repo, &rt, &old, &new, |c| {
            counts[c.change as usize] += 1;
            if json {
                return out.item(&serde_json::to_string(&c).expect("a change serialises"));
            }
            let mark = match (c.change, c.content) {
                (ChangeKind::Added, _) => "+",
                (ChangeKind::Removed, _) => "-",
                (ChangeKind::Modified, true) => "M",
                (ChangeKind::Modified, false) => "U",
            };
            let what = if c.metadata.is_empty() {
                String::new()
            } else {
                format!(" ({})", c.metadata.join(", "))
            };
            out.item(&format!("{mark}    {}{what}", c.path))
        })?;
        out.finish(&format!(
            "{} added, {} removed, {} modified\n",
            counts[0], counts[1], counts[2]
        ))
    })
    .await??;
    Ok(ExitCode::SUCCESS)
}
