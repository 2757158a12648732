//! `tresor init`: a new repository.

use anyhow::Context;
use clap::Args;
use serde_json::json;
use std::process::ExitCode;
use tresor::chunker::ChunkerParams;
use tresor::repository::InitOptions;
use tresor::units;

use super::*;

/// Whether `init` encrypts.
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Encryption {
    /// AES-256-GCM or XChaCha20-Poly1305 (see --cipher), keyed BLAKE3 chunk ids.
    On,
    /// No encryption (for stores already encrypted at rest by other means).
    None,
}

#[derive(Args)]
pub(crate) struct InitArgs {
    #[command(flatten)]
    pub(crate) out: JsonFlag,
    /// Minimum chunk size (bytes, or with KiB/MiB).
    #[arg(long, default_value = "256KiB", value_parser = units::size)]
    pub(crate) chunk_min: u32,
    /// Average chunk size.
    #[arg(long, default_value = "1MiB", value_parser = units::size)]
    pub(crate) chunk_avg: u32,
    /// Maximum chunk size.
    #[arg(long, default_value = "4MiB", value_parser = units::size)]
    pub(crate) chunk_max: u32,
    /// zstd level (1-22), or "none".
    #[arg(long, default_value = "3")]
    pub(crate) compression: String,
    /// Client-side encryption; the password or key file comes from --password-file,
    /// TRESOR_PASSWORD, --key-file, systemd credentials or a prompt.
    #[arg(long, value_enum, default_value = "on", num_args = 0..=1, default_missing_value = "on")]
    pub(crate) encryption: Encryption,
    /// The cipher [default: AES-256-GCM where the CPU has AES instructions, else
    /// XChaCha20-Poly1305]. Both are always readable.
    #[arg(long, value_enum)]
    pub(crate) cipher: Option<CipherArg>,
    /// Share this repository's chunk ids and chunker (not its encryption key), so that
    /// `tresor copy` moves chunks between the two unchanged.
    #[arg(long, value_name = "URL")]
    pub(crate) same_chunker_as: Option<String>,
    /// Key file of the --same-chunker-as repository.
    #[arg(long, requires = "same_chunker_as")]
    pub(crate) from_key_file: Option<std::path::PathBuf>,
    /// Password file of the --same-chunker-as repository.
    #[arg(long, requires = "same_chunker_as")]
    pub(crate) from_password_file: Option<std::path::PathBuf>,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum CipherArg {
    Aes256gcm,
    Xchacha20poly1305,
}

pub(crate) async fn init(g: &Global, args: &InitArgs) -> anyhow::Result<ExitCode> {
    let compression_level =
        match args.compression.as_str() {
            "none" => None,
            level => Some(level.parse().with_context(|| {
                format!("--compression {level:?}: give a zstd level or \"none\"")
            })?),
        };
    let options = InitOptions {
        chunker: ChunkerParams {
            min_size: args.chunk_min,
            avg_size: args.chunk_avg,
            max_size: args.chunk_max,
        },
        compression_level,
        cipher: args.cipher.map(|c| match c {
            CipherArg::Aes256gcm => tresor::crypto::Cipher::Aes256Gcm,
            CipherArg::Xchacha20poly1305 => tresor::crypto::Cipher::XChaCha20Poly1305,
        }),
        same_ids_as: match &args.same_chunker_as {
            Some(url) => {
                let other = access(g)?.other(
                    url,
                    args.from_key_file.as_deref(),
                    args.from_password_file.as_deref(),
                    None,
                );
                Some(other.open(|| ask_secret(url, false)).await?)
            }
            None => None,
        },
    };
    let access = access(g)?;
    let encrypted = args.encryption == Encryption::On;
    let new_key_file = g.key_file.as_ref().filter(|p| encrypted && !p.exists());
    let repo = access
        .init(options, encrypted, || ask_secret(&access.url, true))
        .await?;
    if let Some(path) = new_key_file {
        eprintln!(
            "created key file {}: keep a copy somewhere safe, without it the data is lost",
            path.display()
        );
    }
    if g.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({
                "url": repo.store().url(),
                "config": repo.config(),
            }))?
        );
    } else {
        println!(
            "created tresor repository {} at {}",
            repo.config().id,
            repo.store().url()
        );
    }
    Ok(ExitCode::SUCCESS)
}
