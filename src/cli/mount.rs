//! `tresor mount DIR`: the repository as a read-only filesystem until SIGINT or SIGTERM (or
//! `umount DIR`); front end of `tresor::mount`.

use clap::Args;
use std::path::PathBuf;
use std::process::ExitCode;

use super::*;

#[derive(Args)]
pub(crate) struct MountArgs {
    /// An empty directory to mount on.
    pub(crate) dir: PathBuf,
    #[command(flatten)]
    pub(crate) filter: FilterArgs,
}

pub(crate) async fn mount(g: &Global, args: &MountArgs) -> anyhow::Result<ExitCode> {
    use tokio::signal::unix::{signal, SignalKind};
    if !std::path::Path::new("/dev/fuse").exists() {
        return Err(tresor::Error::Config(
            "/dev/fuse is missing: load the fuse module (`modprobe fuse`), or in a container \
             pass the device (`--device /dev/fuse --cap-add SYS_ADMIN`)"
                .into(),
        )
        .into());
    }
    let repo = open(g).await?;
    let snapshots = tresor::snapshot::list(&repo, &args.filter.to_filter()).await?;
    let count = snapshots.len();
    let rt = tokio::runtime::Handle::current();
    let mounted = tresor::mount::mount(repo, rt, snapshots, &args.dir)?;
    eprintln!(
        "{count} snapshots mounted read-only at {}; Ctrl-C, SIGTERM or `umount {}` unmounts",
        args.dir.display(),
        args.dir.display()
    );
    let mut term = signal(SignalKind::terminate())?;
    let mut tick = tokio::time::interval(std::time::Duration::from_millis(200));
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            _ = term.recv() => break,
            _ = tick.tick() => if mounted.is_finished() { break },
        }
    }
    let dir = args.dir.clone();
    tokio::task::spawn_blocking(move || mounted.unmount(&dir)).await??;
    eprintln!("unmounted {}", args.dir.display());
    Ok(ExitCode::SUCCESS)
}
