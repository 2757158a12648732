//! What a packager takes from the binary: shell completions and the manual page, generated from
//! the CLI itself, so they name every command there is, and a version that names the
//! repository formats.

use crate::common::*;

#[test]
fn completions_and_the_manual_page_come_from_the_cli() {
    let env = Env::empty();
    for (shell, marker) in [
        ("bash", "complete -F"),
        ("zsh", "#compdef tresor"),
        ("fish", "complete -c tresor"),
    ] {
        let out = env.tresor(&["completions", shell]);
        assert!(out.status.success(), "{shell}: {}", stderr(&out));
        let script = String::from_utf8_lossy(&out.stdout);
        assert!(script.contains(marker), "{shell}: no {marker:?}");
        for command in ["drill", "restore", "workload", "verify"] {
            assert!(script.contains(command), "{shell}: no {command}");
        }
    }
    let out = env.tresor(&["completions", "tcsh"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let out = env.tresor(&["--version"]);
    let version = String::from_utf8_lossy(&out.stdout);
    assert!(
        version.starts_with("tresor ") && version.contains("reads repository formats 1 and 2"),
        "{version}"
    );
    let out = env.tresor(&["man"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let page = String::from_utf8_lossy(&out.stdout);
    assert!(
        page.contains(".TH tresor 1") && page.contains("drill"),
        "{page}"
    );
}
