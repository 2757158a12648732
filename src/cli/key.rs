//! `tresor key`: list, add, remove and replace key slots.

use anyhow::Context;
use clap::{Args, Subcommand};
use serde_json::json;
use std::path::PathBuf;
use std::process::ExitCode;
use tresor::crypto::Secret;
use zeroize::Zeroizing;

use super::*;

#[derive(Subcommand)]
pub(crate) enum KeyCommand {
    /// List key slots.
    List(JsonFlag),
    /// Add a key slot (a passphrase or a key file) that opens the repository too.
    Add(NewKeyArgs),
    /// Remove a key slot (not the one used now, nor the last).
    Remove {
        /// Slot id or unique prefix, as `key list` shows it.
        id: String,
        #[command(flatten)]
        out: JsonFlag,
    },
    /// Replace the passphrase or key file used now by a new one.
    Passwd(NewKeyArgs),
    /// Sign the config of a repository made before configs carried a MAC (every other command
    /// refuses such a config, since whoever may write the store could have stripped the MAC
    /// to change a field). Check the fields it prints first: they are what gets signed.
    UpgradeConfig {
        /// Print the config's fields and sign nothing.
        #[arg(long)]
        dry_run: bool,
        #[command(flatten)]
        out: JsonFlag,
    },
}

#[derive(Args)]
pub(crate) struct NewKeyArgs {
    #[command(flatten)]
    pub(crate) out: JsonFlag,
    /// File whose first line is the new password [default: TRESOR_NEW_PASSWORD, or a prompt].
    #[arg(long, conflicts_with = "new_key_file")]
    pub(crate) new_password_file: Option<PathBuf>,
    /// New key file (created with a random key when missing).
    #[arg(long)]
    pub(crate) new_key_file: Option<PathBuf>,
}

/// The secret of a new key slot, from the `key add`/`key passwd` options.
pub(crate) fn new_secret(args: &NewKeyArgs) -> anyhow::Result<Secret> {
    if let Some(path) = &args.new_key_file {
        return Ok(key_file(path, true)?);
    }
    if let Some(path) = &args.new_password_file {
        return Ok(Secret::from_password_file(path)?);
    }
    if let Ok(p) = std::env::var("TRESOR_NEW_PASSWORD") {
        return Ok(Secret::Passphrase(Zeroizing::new(p)));
    }
    prompt("new password", true).context(
        "give --new-password-file, --new-key-file or TRESOR_NEW_PASSWORD (or run on a terminal)",
    )
}

/// `key upgrade-config`: the config's fields, and (unless `dry_run`) the repository opened with
/// them signed.
async fn upgrade_config(g: &Global, dry_run: bool) -> anyhow::Result<ExitCode> {
    let access = access(g)?;
    let config = if dry_run {
        let store = tresor::store::Store::open(&access.url, &access.store, false)?;
        Repository::peek_config(&store).await?
    } else {
        let repo = access
            .open_upgrading(|| ask_secret(&access.url, false))
            .await?;
        repo.config().clone()
    };
    let shown = serde_json::to_value(&config)?;
    if g.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({ "signed": !dry_run, "config": shown }))?
        );
    } else {
        println!("{}", serde_json::to_string_pretty(&shown)?);
        if dry_run {
            println!("(dry run: nothing signed)");
        } else {
            println!("the config of {} carries a MAC", access.url);
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub(crate) async fn key(g: &Global, cmd: &KeyCommand) -> anyhow::Result<ExitCode> {
    if let KeyCommand::UpgradeConfig { dry_run, .. } = cmd {
        return upgrade_config(g, *dry_run).await;
    }
    let repo = open(g).await?;
    anyhow::ensure!(
        repo.is_encrypted(),
        "{} is not encrypted; it has no keys",
        repo.store().url()
    );
    match cmd {
        KeyCommand::List(_) => {
            let keys = repo.list_keys().await?;
            if g.json {
                let all: Vec<_> = keys
                    .iter()
                    .map(|(id, slot)| {
                        json!({
                            "id": id,
                            "kind": slot.kind,
                            "created": slot.created.to_rfc3339(),
                            "host": slot.host,
                            "current": Some(id.as_str()) == repo.key_slot(),
                        })
                    })
                    .collect();
                println!("{}", serde_json::to_string_pretty(&all)?);
            } else {
                println!("{:<10} {:<11} {:<20} host", "id", "kind", "created");
                for (id, slot) in &keys {
                    let current = if Some(id.as_str()) == repo.key_slot() {
                        " (current)"
                    } else {
                        ""
                    };
                    println!(
                        "{:<10} {:<11} {:<20} {}{current}",
                        &id[..8],
                        format!("{:?}", slot.kind).to_lowercase(),
                        slot.created.format("%Y-%m-%d %H:%M:%S"),
                        slot.host
                    );
                }
            }
        }
        KeyCommand::Add(args) => {
            let id = repo.add_key(&new_secret(args)?).await?;
            report(
                g,
                json!({ "added": id }),
                &format!("added key slot {}", &id[..8]),
            )?;
        }
        KeyCommand::Remove { id, .. } => {
            repo.remove_key(id).await?;
            report(
                g,
                json!({ "removed": id }),
                &format!("removed key slot {id}"),
            )?;
        }
        KeyCommand::Passwd(args) => {
            let (id, old) = repo.replace_key(&new_secret(args)?).await?;
            report(
                g,
                json!({ "added": id, "removed": old }),
                &format!("replaced key slot {} by {}", &old[..8], &id[..8]),
            )?;
        }
        KeyCommand::UpgradeConfig { .. } => unreachable!("handled above"),
    }
    Ok(ExitCode::SUCCESS)
}
