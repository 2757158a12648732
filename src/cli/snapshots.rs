//! Looking at snapshots and deciding which stay: `snapshots`, `ls`, `protect`, `forget`.

use clap::Args;
use serde_json::json;
use std::process::ExitCode;
use tresor::snapshot::{self, Kind};
use tresor::units;

use super::*;

#[derive(Args)]
pub(crate) struct SnapshotsArgs {
    #[command(flatten)]
    pub(crate) out: JsonFlag,
    #[command(flatten)]
    pub(crate) filter: FilterArgs,
}

pub(crate) async fn snapshots(g: &Global, args: &SnapshotsArgs) -> anyhow::Result<ExitCode> {
    let repo = open(g).await?;
    let filter = args.filter.to_filter();
    let listed = snapshot::list(&repo, &filter).await?;
    // A workload's consistency is in its record: read for workloads only (a few).
    let rt = tokio::runtime::Handle::current();
    let workload = |l: &tresor::snapshot::Listed| {
        (l.snapshot.kind == Kind::Workload)
            .then(|| {
                tokio::task::block_in_place(|| tresor::workload::load_record(&repo, &rt, l)).ok()
            })
            .flatten()
    };
    if g.json {
        let mut all = Vec::new();
        for l in &listed {
            let mut out = snapshot_json(l);
            if let Some(r) = workload(l) {
                out["consistency"] = json!(r.consistency);
                out["downtime_ms"] = json!(r.downtime_ms);
                out["consistent"] = json!(r.is_consistent());
            }
            all.push(out);
        }
        println!("{}", serde_json::to_string_pretty(&all)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{:<10} {:<20} {:<12} {:<7} {:<20} {:>10} {:>10}  flags",
        "id", "time", "host", "kind", "name", "size", "new"
    );
    for l in &listed {
        let s = &l.snapshot;
        println!(
            "{:<10} {:<20} {:<12} {:<7} {:<20} {:>10} {:>10}  {}",
            &l.id[..8],
            s.time.format("%Y-%m-%d %H:%M:%S"),
            s.host,
            format!("{:?}", s.kind).to_lowercase(),
            s.name,
            human_bytes(s.summary.logical_bytes),
            human_bytes(s.summary.chunks.bytes_new),
            match workload(l) {
                Some(r) => format!(
                    "{:?} {:.1}s{}",
                    r.consistency,
                    r.downtime_ms as f64 / 1000.0,
                    if r.is_consistent() { "" } else { " live" }
                )
                .to_lowercase(),
                None if s.partial => "partial".into(),
                None => String::new(),
            },
        );
    }
    println!("{} snapshots", listed.len());
    Ok(ExitCode::SUCCESS)
}

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
    use std::io::Write;
    use tresor::catalog::EntryKind;
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    let mut first = true;
    let mut failed = None;
    tresor::volume::browse::entries(repo, rt, snap, path, |e| {
        let (kind, letter) = match e.kind {
            EntryKind::Dir => ("dir", 'd'),
            EntryKind::File => ("file", '-'),
            EntryKind::Symlink => ("symlink", 'l'),
            EntryKind::Hardlink => ("hardlink", 'h'),
            EntryKind::Fifo => ("fifo", 'p'),
            EntryKind::Socket => ("socket", 's'),
            EntryKind::CharDevice => ("char", 'c'),
            EntryKind::BlockDevice => ("block", 'b'),
        };
        let mtime = chrono::DateTime::from_timestamp(
            e.mtime_ns.div_euclid(1_000_000_000),
            e.mtime_ns.rem_euclid(1_000_000_000) as u32,
        )
        .unwrap_or_default();
        let link = e.link.as_deref().map(String::from_utf8_lossy);
        let line = if json {
            let entry = json!({
                "path": e.display_path(), "type": kind, "mode": format!("{:o}", e.mode),
                "uid": e.uid, "gid": e.gid, "user": e.user, "group": e.group, "size": e.size,
                "mtime": mtime.to_rfc3339(), "link": link,
            });
            let sep = if first { "[\n" } else { ",\n" };
            format!("{sep}{entry}")
        } else {
            let owner = e.user.clone().unwrap_or_else(|| e.uid.to_string());
            let group = e.group.clone().unwrap_or_else(|| e.gid.to_string());
            let arrow = match (&e.kind, &link) {
                (EntryKind::Symlink, Some(l)) => format!(" -> {l}"),
                (EntryKind::Hardlink, Some(l)) => format!(" => {l}"),
                _ => String::new(),
            };
            format!(
                "{letter}{} {owner}/{group} {:>12} {} {}{arrow}\n",
                permissions(e.mode),
                e.size,
                mtime.format("%Y-%m-%d %H:%M:%S"),
                e.display_path()
            )
        };
        first = false;
        match out.write_all(line.as_bytes()) {
            Ok(()) => true,
            Err(err) => {
                failed = Some(err);
                false
            }
        }
    })?;
    let end = match (json, first) {
        (false, _) => "",
        (true, true) => "[]\n",
        (true, false) => "\n]\n",
    };
    let written = out.write_all(end.as_bytes()).and_then(|()| out.flush());
    match failed.map_or(written, Err) {
        // A closed pipe (`| head`) is the reader's choice, not a failure.
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
            Err(tresor::Error::io("(stdout)", e))
        }
        _ => Ok(()),
    }
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
    use tresor::catalog::EntryKind;
    use tresor::volume::browse;
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
    use std::io::Write;
    use tresor::volume::browse::ChangeKind;
    let repo = open(g).await?;
    let old = snapshot::resolve(&repo, &args.old, None).await?;
    let new = snapshot::resolve(&repo, &args.new, None).await?;
    let (rt, json) = (tokio::runtime::Handle::current(), g.json);
    tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
        let mut out = std::io::BufWriter::new(std::io::stdout().lock());
        let mut counts = [0u64; 3];
        let mut failed = None;
        tresor::volume::browse::diff(&repo, &rt, &old, &new, |c| {
            let n = counts.iter().sum::<u64>();
            counts[c.change as usize] += 1;
            let line = if json {
                let sep = if n == 0 { "[\n" } else { ",\n" };
                format!(
                    "{sep}{}",
                    serde_json::to_string(&c).expect("a change serialises")
                )
            } else {
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
                format!("{mark}    {}{what}\n", c.path)
            };
            match out.write_all(line.as_bytes()) {
                Ok(()) => true,
                Err(e) => {
                    failed = Some(e);
                    false
                }
            }
        })?;
        let end = match (json, counts.iter().sum::<u64>()) {
            (true, 0) => "[]\n".to_string(),
            (true, _) => "\n]\n".to_string(),
            (false, _) => format!(
                "{} added, {} removed, {} modified\n",
                counts[0], counts[1], counts[2]
            ),
        };
        let written = out.write_all(end.as_bytes()).and_then(|()| out.flush());
        match failed.map_or(written, Err) {
            Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e.into()),
            _ => Ok(()),
        }
    })
    .await??;
    Ok(ExitCode::SUCCESS)
}

#[derive(Args)]
pub(crate) struct ProtectArgs {
    /// Snapshot id, unique id prefix (4+ hex digits), or name (its newest snapshot).
    pub(crate) snapshot: String,
    /// Lift the protection.
    #[arg(long)]
    pub(crate) remove: bool,
}

pub(crate) async fn protect(g: &Global, args: &ProtectArgs) -> anyhow::Result<ExitCode> {
    let repo = open(g).await?;
    let id = snapshot::resolve(&repo, &args.snapshot, None).await?.id;
    repo.set_protected(&id, !args.remove).await?;
    let state = if args.remove {
        "no longer protected"
    } else {
        "protected from forget"
    };
    println!("snapshot {} is {state}", &id[..8]);
    Ok(ExitCode::SUCCESS)
}

#[derive(Args)]
pub(crate) struct ForgetArgs {
    #[command(flatten)]
    pub(crate) out: JsonFlag,
    /// Keep the newest N snapshots.
    #[arg(long, default_value_t = 0)]
    pub(crate) keep_last: usize,
    /// Keep the newest snapshot of each of the last N hours that have one.
    #[arg(long, default_value_t = 0)]
    pub(crate) keep_hourly: usize,
    #[arg(long, default_value_t = 0)]
    pub(crate) keep_daily: usize,
    #[arg(long, default_value_t = 0)]
    pub(crate) keep_weekly: usize,
    #[arg(long, default_value_t = 0)]
    pub(crate) keep_monthly: usize,
    #[arg(long, default_value_t = 0)]
    pub(crate) keep_yearly: usize,
    /// Keep everything taken within this long of the newest snapshot (30d, 12h).
    #[arg(long, value_parser = units::span)]
    pub(crate) keep_within: Option<chrono::Duration>,
    #[command(flatten)]
    pub(crate) filter: FilterArgs,
    /// Show what would go, remove nothing.
    #[arg(long)]
    pub(crate) dry_run: bool,
}

pub(crate) async fn forget(g: &Global, args: &ForgetArgs) -> anyhow::Result<ExitCode> {
    use tresor::retention::Policy;
    let within = args.keep_within;
    let policy = Policy {
        last: args.keep_last,
        hourly: args.keep_hourly,
        daily: args.keep_daily,
        weekly: args.keep_weekly,
        monthly: args.keep_monthly,
        yearly: args.keep_yearly,
        within,
    };
    anyhow::ensure!(
        !policy.is_empty(),
        "give at least one --keep-* rule; forget never removes every snapshot of a source"
    );
    let repo = open(g).await?;
    let filter = args.filter.to_filter();
    let (groups, removed) =
        tresor::retention::forget(&repo, &policy, &filter, args.dry_run).await?;
    if g.json {
        println!(
            "{}",
            serde_json::to_string_pretty(
                &json!({ "dry_run": args.dry_run, "removed": removed, "groups": groups })
            )?
        );
    } else {
        for group in &groups {
            println!("{} {:?} {}:", group.host, group.kind, group.name);
            for d in &group.snapshots {
                let what = if d.keep {
                    format!("keep   ({})", d.reasons.join(", "))
                } else if args.dry_run {
                    "would remove".to_string()
                } else {
                    "removed".to_string()
                };
                println!(
                    "  {} {}  {what}",
                    &d.id[..8],
                    d.time.format("%Y-%m-%d %H:%M:%S")
                );
            }
        }
        let verb = if args.dry_run {
            "would remove"
        } else {
            "removed"
        };
        println!("{verb} {removed} snapshots; `tresor gc` frees the data only they used");
    }
    Ok(ExitCode::SUCCESS)
}
