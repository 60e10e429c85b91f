//! The repository's documentation against the code: every config key of the example
//! config and of the governor's policy defaults is in docs/configuration.md, every
//! relative link in README.md and docs/ resolves inside the repository, and no README
//! points at a machine's own paths.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ is inside the repository")
        .to_path_buf()
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(repo().join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

/// `section.key` for every key of a TOML file, the commented-out examples (`# key = v`
/// under a section) included; tier tables become `governor.policy.tiers.<tier>`.
fn keys(toml_text: &str) -> BTreeSet<String> {
    let mut section = String::new();
    let mut out = BTreeSet::new();
    for line in toml_text.lines() {
        let line = line.trim();
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = match name.strip_prefix("governor.policy.tiers.") {
                Some(_) => "governor.policy.tiers.<tier>".to_string(),
                None => name.to_string(),
            };
            continue;
        }
        let commented = line.starts_with('#');
        let body = line.strip_prefix('#').map(str::trim).unwrap_or(line);
        let Some((key, value)) = body.split_once(" = ") else {
            continue;
        };
        // A commented-out example is `# key = VALUE`; prose that happens to hold " = "
        // is not (its right side is no TOML value).
        if commented && toml::from_str::<toml::Table>(&format!("k = {value}")).is_err() {
            continue;
        }
        let is_key = !key.is_empty()
            && key
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
        if is_key && !section.is_empty() {
            out.insert(format!("{section}.{key}"));
        }
    }
    out
}

#[test]
fn every_config_key_is_documented() {
    let doc = read("docs/configuration.md");
    let mut all = keys(&read("systemd/gemmad.toml"));
    all.extend(keys(&read("governor/policy.defaults.toml")));
    // The parser finds the keys it should: one commented example, one tier key.
    assert!(all.contains("model.dir"), "{all:?}");
    assert!(
        all.contains("governor.policy.tiers.<tier>.slice"),
        "{all:?}"
    );
    assert!(all.len() > 80, "{all:?}");
    let missing: Vec<_> = all
        .iter()
        .filter(|k| !doc.contains(&format!("`{k}`")))
        .collect();
    assert!(
        missing.is_empty(),
        "not in docs/configuration.md: {missing:?}"
    );
}

/// Markdown link targets `](target)` in `text`.
fn link_targets(text: &str) -> Vec<String> {
    text.split("](")
        .skip(1)
        .filter_map(|rest| rest.split_once(')').map(|(t, _)| t.to_string()))
        .collect()
}

#[test]
fn links_resolve_inside_the_repository() {
    let mut files = vec![PathBuf::from("README.md")];
    for e in std::fs::read_dir(repo().join("docs")).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "md") {
            files.push(p.strip_prefix(repo()).unwrap().to_path_buf());
        }
    }
    assert!(files.len() > 5, "{files:?}");
    let mut bad = Vec::new();
    for f in &files {
        let text = read(f.to_str().unwrap());
        for t in link_targets(&text) {
            let path = t.split('#').next().unwrap_or("");
            if path.is_empty() || t.starts_with("http://") || t.starts_with("https://") {
                continue;
            }
            let target = repo().join(f.parent().unwrap()).join(path);
            let inside = target
                .canonicalize()
                .is_ok_and(|c| c.starts_with(repo().canonicalize().unwrap()));
            if !inside {
                bad.push(format!("{}: {t}", f.display()));
            }
        }
    }
    assert!(
        bad.is_empty(),
        "links that do not resolve in the repo: {bad:?}"
    );
}

#[test]
fn readmes_name_no_machine_paths() {
    for f in ["README.md", "bench/README.md", "tools/README.md"] {
        let text = read(f);
        for bad in ["/work/", "../shared", "/home/", "/root/"] {
            assert!(!text.contains(bad), "{f} names {bad}");
        }
    }
}
