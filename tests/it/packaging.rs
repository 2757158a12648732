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

/// Every command of the CLI, with its `--help` text, found by walking `Commands:` lists.
fn every_help(env: &Env) -> Vec<(Vec<String>, String)> {
    let mut all = Vec::new();
    let mut todo = vec![Vec::<String>::new()];
    while let Some(path) = todo.pop() {
        let mut args: Vec<&str> = path.iter().map(String::as_str).collect();
        args.push("--help");
        let out = env.tresor(&args);
        assert!(out.status.success(), "{args:?}: {}", stderr(&out));
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        if let Some(list) = text.split("\nCommands:\n").nth(1) {
            for line in list.lines().take_while(|l| !l.is_empty()) {
                let name = line.strip_prefix("  ").filter(|l| !l.starts_with(' '));
                match name.and_then(|l| l.split_whitespace().next()) {
                    Some("help") | None => {}
                    Some(name) => todo.push([path.clone(), vec![name.to_string()]].concat()),
                }
            }
        }
        all.push((path, text));
    }
    all
}

/// The `--flags` a text names (a `--` that starts a word).
fn flags(text: &str) -> std::collections::BTreeSet<String> {
    let re = regex::Regex::new(r"(^|[^\w-])(--[a-z][a-z0-9-]*)").unwrap();
    re.captures_iter(text).map(|c| c[2].to_string()).collect()
}

/// The README cannot drift from the CLI: every `--flag` it names is a flag of some command
/// (or of another tool it shows, listed here), and every `tresor WORD` it runs in a code block
/// is a command.
#[test]
fn the_readme_names_only_flags_and_commands_that_exist() {
    const OTHER_TOOLS: &[&str] = &[
        "--key",
        "--read",
        "--write", // garage bucket allow
        "--now",   // systemctl enable
        "--release",
        "--profile", // cargo build
        "--xattrs",
        "--xattrs-include", // GNU tar
    ];
    let env = Env::empty();
    let helps = every_help(&env);
    assert!(helps.len() > 20, "{} commands", helps.len());
    let known: std::collections::BTreeSet<String> =
        helps.iter().flat_map(|(_, text)| flags(text)).collect();
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let unknown: Vec<String> = flags(&readme)
        .into_iter()
        .filter(|f| !known.contains(f) && !OTHER_TOOLS.contains(&f.as_str()))
        .collect();
    assert!(
        unknown.is_empty(),
        "the README names flags no command has: {unknown:?}"
    );

    let commands: std::collections::BTreeSet<&str> = helps
        .iter()
        .filter_map(|(path, _)| path.first().map(String::as_str))
        .collect();
    let mut in_code = false;
    for line in readme.lines() {
        if line.starts_with("```") {
            in_code = !in_code;
            continue;
        }
        let Some(rest) = line
            .trim_start()
            .strip_prefix("tresor ")
            .filter(|_| in_code)
        else {
            continue;
        };
        // The first word that is neither a flag nor a flag's value; none for `tresor --version`.
        let words: Vec<&str> = rest.split('#').next().unwrap().split_whitespace().collect();
        let word = words.iter().enumerate().find(|(i, w)| {
            !w.starts_with('-')
                && (*i == 0 || !words[i - 1].starts_with("--") || commands.contains(*w))
        });
        if let Some((_, word)) = word {
            assert!(
                commands.contains(word),
                "the README runs `tresor {word}`: {line}"
            );
        }
    }
}

/// Every object key and string value of a JSON document.
fn json_words(v: &serde_json::Value, out: &mut std::collections::BTreeSet<String>) {
    match v {
        serde_json::Value::Object(m) => {
            for (k, v) in m {
                out.insert(k.clone());
                json_words(v, out);
            }
        }
        serde_json::Value::Array(a) => a.iter().for_each(|v| json_words(v, out)),
        serde_json::Value::String(s) => {
            out.insert(s.clone());
        }
        _ => {}
    }
}

/// The JSON fields the README names for `snapshots`, `ls`, `find` and `diff` (each backticked
/// `snake_case` word of the paragraph that describes the output) are keys or values of the real
/// output, but for values this repository cannot show (listed) and the command's name.
#[test]
fn the_readme_names_only_json_fields_that_exist() {
    let env = Env::new();
    let src = env.path("src");
    build_tree(&src);
    let old = env.backup("data", &src, &[]);
    std::fs::write(src.join("added"), b"new").unwrap();
    std::fs::remove_file(src.join("-dash")).unwrap();
    std::fs::write(src.join("small.txt"), b"changed").unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(
        src.join("empty-file"),
        std::fs::Permissions::from_mode(0o600),
    )
    .unwrap();
    let new = env.backup("data", &src, &[]);
    let (old, new) = (old["id"].as_str().unwrap(), new["id"].as_str().unwrap());
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let word = regex::Regex::new(r"`([a-z_]+)`").unwrap();
    for (paragraph, args, absent) in [
        (
            "The JSON is an array, oldest first",
            vec!["snapshots"],
            &["block", "image", "workload"][..],
        ),
        (
            "`ls` prints one",
            vec!["ls", "data"],
            &["socket", "char", "block"][..],
        ),
        ("`find` reads the catalog", vec!["find", "*"], &["ls"][..]), // `ls --json` objects
        (
            "`diff` reads both catalogs",
            vec!["diff", old, new],
            &["type", "owner", "xattrs"][..],
        ),
    ] {
        let start = readme.find(paragraph).expect(paragraph);
        let text = &readme[start..];
        let text = &text[..text.find("\n\n").unwrap_or(text.len())];
        let mut output = std::collections::BTreeSet::new();
        json_words(&env.json(&args), &mut output);
        // The paragraph starts with the command's own name.
        let named = word.captures_iter(text).map(|c| c[1].to_string());
        for named in named.filter(|n| n != args[0]) {
            assert!(
                output.contains(&named) || absent.contains(&named.as_str()),
                "the README names `{named}` for `tresor {}`, which its JSON lacks",
                args.join(" ")
            );
        }
    }
}
