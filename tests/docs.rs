//! The docs stay true to the code.
//!
//! - Every config key the daemon accepts is documented in
//!   `docs/configuration.md` and appears in `deploy/tunneler.example.toml`
//!   (commented out is fine for optional keys), and neither names a key
//!   the daemon would refuse. The key list is not kept by hand: it is read
//!   from the config parser itself. Every config section refuses unknown
//!   keys, and its error lists the keys it expects, so probing each section
//!   (and each key that turns out to be a section) with an unknown key
//!   through `tunneler check-config` walks the whole key tree.
//! - The example config passes `tunneler check-config`.
//! - Every relative link in the Markdown files points at a file that
//!   exists, and every `#anchor` at a heading of that file.
//!
//! Runs without root: `check-config` opens no keys and binds nothing.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn read(rel: &str) -> String {
    fs::read_to_string(repo().join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

/// Runs `tunneler check-config` on `text` and returns what it printed.
fn check_config(text: &str) -> (bool, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("probe.toml");
    fs::write(&path, text).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_tunneler"))
        .args(["check-config", "--config"])
        .arg(&path)
        .output()
        .expect("run tunneler check-config");
    let mut s = String::from_utf8_lossy(&out.stdout).into_owned();
    s.push_str(&String::from_utf8_lossy(&out.stderr));
    (out.status.success(), s)
}

/// A section path: its names, and for each whether it is an array of
/// tables (`[[node]]`).
type Section = Vec<(String, bool)>;

/// The TOML that opens `section` (with an `[[array]]` header for every
/// array on the way, so nested tables land in an element).
fn headers(section: &Section) -> String {
    let mut out = String::new();
    for i in 0..section.len() {
        let dotted: Vec<&str> = section[..=i].iter().map(|(n, _)| n.as_str()).collect();
        let dotted = dotted.join(".");
        if section[i].1 {
            out.push_str(&format!("[[{dotted}]]\n"));
        } else if i + 1 == section.len() {
            out.push_str(&format!("[{dotted}]\n"));
        }
    }
    out
}

/// The keys a section accepts, from the parser's refusal of an unknown
/// one: `None` when the text opened as `section` is not a table at all.
fn fields_of(section: &Section) -> Option<Vec<String>> {
    let probe = format!("{}zz_not_a_key = 1\n", headers(section));
    let (ok, out) = check_config(&probe);
    assert!(!ok, "an unknown key was accepted:\n{probe}");
    let rest = out.split("unknown field `zz_not_a_key`").nth(1)?;
    let list = rest.lines().next().unwrap_or("");
    // "expected one of `a`, `b`", "expected `a`", "there are no fields".
    let fields: Vec<String> = list
        .split('`')
        .skip(1)
        .step_by(2)
        .map(str::to_string)
        .collect();
    Some(fields)
}

/// Every key the config accepts, as `ssh.user`, `proxy.tls.listen`,
/// `node[].name`: the walk described in the module comment.
fn config_keys() -> BTreeSet<String> {
    let mut keys = BTreeSet::new();
    let mut todo: Vec<Section> = vec![Vec::new()];
    while let Some(section) = todo.pop() {
        let fields = fields_of(&section).unwrap_or_else(|| {
            panic!("section {section:?} refused an unknown key without naming its keys")
        });
        assert!(!fields.is_empty(), "section {section:?} accepts no keys");
        for f in fields {
            let mut table = section.clone();
            table.push((f.clone(), false));
            let mut array = section.clone();
            array.push((f.clone(), true));
            if fields_of(&table).is_some() {
                todo.push(table);
            } else if fields_of(&array).is_some() {
                todo.push(array);
            } else {
                keys.insert(key_name(&table));
            }
        }
    }
    keys
}

fn key_name(path: &Section) -> String {
    path.iter()
        .map(|(n, arr)| if *arr { format!("{n}[]") } else { n.clone() })
        .collect::<Vec<_>>()
        .join(".")
}

/// Keys documented in `docs/configuration.md`: the first cell of a table
/// row when it is one backquoted dotted key.
fn documented_keys(doc: &str) -> BTreeSet<String> {
    let mut keys = BTreeSet::new();
    for line in doc.lines() {
        let Some(cell) = line.strip_prefix('|').and_then(|l| l.split('|').next()) else {
            continue;
        };
        let cell = cell.trim();
        let Some(key) = cell.strip_prefix('`').and_then(|c| c.strip_suffix('`')) else {
            continue;
        };
        if key.contains('.')
            && key
                .chars()
                .all(|c| c.is_ascii_lowercase() || c == '_' || c == '.' || c == '[' || c == ']')
        {
            keys.insert(key.to_string());
        }
    }
    keys
}

/// Keys in the example config, set or commented out: a `[section]` or
/// `[[section]]` header (commented or not) opens a section, and a
/// `key = value` line (commented or not) names a key in it.
fn example_keys(text: &str) -> BTreeSet<String> {
    let mut keys = BTreeSet::new();
    let mut section = String::new();
    for line in text.lines() {
        let l = line.trim_start_matches('#').trim();
        if let Some(h) = l.strip_prefix("[[").and_then(|h| h.split("]]").next()) {
            section = format!("{h}[]");
            continue;
        }
        if let Some(h) = l.strip_prefix('[').and_then(|h| h.split(']').next()) {
            if h.chars()
                .all(|c| c.is_ascii_lowercase() || c == '_' || c == '.')
            {
                // `[node.x]` inside an array element keeps the `[]`.
                section = match h.split_once('.') {
                    Some((first, rest)) if section.starts_with(&format!("{first}[]")) => {
                        format!("{first}[].{rest}")
                    }
                    _ => h.to_string(),
                };
                continue;
            }
        }
        let Some((k, _)) = l.split_once('=') else {
            continue;
        };
        let k = k.trim();
        if !k.is_empty() && k.chars().all(|c| c.is_ascii_lowercase() || c == '_') {
            keys.insert(if section.is_empty() {
                k.to_string()
            } else {
                format!("{section}.{k}")
            });
        }
    }
    keys
}

fn diff(want: &BTreeSet<String>, have: &BTreeSet<String>) -> Vec<String> {
    want.difference(have).cloned().collect()
}

#[test]
fn every_config_key_is_documented_and_in_the_example() {
    let keys = config_keys();
    // The walk must have reached the nested sections, or it proves little.
    for k in [
        "ssh.user",
        "proxy.tls.client_names",
        "discovery.kubernetes.in_cluster",
        "node[].name",
    ] {
        assert!(keys.contains(k), "the key walk missed {k}: {keys:?}");
    }

    let doc = documented_keys(&read("docs/configuration.md"));
    let example = example_keys(&read("deploy/tunneler.example.toml"));
    let mut problems = Vec::new();
    for k in diff(&keys, &doc) {
        problems.push(format!("docs/configuration.md does not document `{k}`"));
    }
    for k in diff(&doc, &keys) {
        problems.push(format!(
            "docs/configuration.md documents `{k}`, which the config refuses"
        ));
    }
    for k in diff(&keys, &example) {
        problems.push(format!(
            "deploy/tunneler.example.toml lacks `{k}` (a commented-out line will do)"
        ));
    }
    for k in diff(&example, &keys) {
        problems.push(format!(
            "deploy/tunneler.example.toml names `{k}`, which the config refuses"
        ));
    }
    assert!(
        problems.is_empty(),
        "{} key(s) out of step:\n{}",
        problems.len(),
        problems.join("\n")
    );
}

#[test]
fn the_example_config_is_valid() {
    let (ok, out) = check_config(&read("deploy/tunneler.example.toml"));
    assert!(
        ok,
        "tunneler check-config refuses deploy/tunneler.example.toml:\n{out}"
    );
}

/// The README's minimal config is what a newcomer copies first: it must
/// pass `check-config` as printed.
#[test]
fn the_readme_minimal_config_is_valid() {
    let readme = read("README.md");
    let section = readme
        .split("\n## A minimal config\n")
        .nth(1)
        .expect("README.md has a \"## A minimal config\" section");
    let block = section
        .split("```toml\n")
        .nth(1)
        .and_then(|b| b.split("\n```").next())
        .expect("a ```toml block in README.md's minimal config section");
    assert!(block.contains("[[node]]"), "{block}");
    let (ok, out) = check_config(block);
    assert!(
        ok,
        "tunneler check-config refuses README.md's minimal config:\n{out}"
    );
}

/// GitHub's anchor for a heading: lower case, punctuation dropped, spaces
/// to `-`; a repeated heading gets `-1`, `-2`, ...
fn anchors(md: &str) -> BTreeSet<String> {
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    let mut out = BTreeSet::new();
    let mut fenced = false;
    for line in md.lines() {
        if line.trim_start().starts_with("```") {
            fenced = !fenced;
            continue;
        }
        if fenced || !line.starts_with('#') {
            continue;
        }
        let text = line.trim_start_matches('#').trim();
        let slug: String = text
            .to_lowercase()
            .chars()
            .filter(|c| c.is_alphanumeric() || *c == ' ' || *c == '-' || *c == '_')
            .map(|c| if c == ' ' { '-' } else { c })
            .collect();
        let n = seen.entry(slug.clone()).or_insert(0);
        out.insert(if *n == 0 {
            slug.clone()
        } else {
            format!("{slug}-{n}")
        });
        *n += 1;
    }
    out
}

/// `(target, line)` of every inline link `[text](target)` outside code.
fn links(md: &str) -> Vec<(String, usize)> {
    let mut out = Vec::new();
    let mut fenced = false;
    for (i, line) in md.lines().enumerate() {
        if line.trim_start().starts_with("```") {
            fenced = !fenced;
            continue;
        }
        if fenced {
            continue;
        }
        // Drop inline code spans: `a](b)` inside backquotes is not a link.
        let plain: String = line.split('`').step_by(2).collect::<Vec<_>>().join(" ");
        let mut rest = plain.as_str();
        while let Some(p) = rest.find("](") {
            let after = &rest[p + 2..];
            let Some(end) = after.find(')') else { break };
            out.push((after[..end].to_string(), i + 1));
            rest = &after[end..];
        }
    }
    out
}

fn markdown_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        let name = e.file_name();
        let name = name.to_string_lossy();
        if p.is_dir() {
            if !name.starts_with('.') && name != "target" && name != "fuzz" {
                markdown_files(&p, out);
            }
        } else if name.ends_with(".md") {
            out.push(p);
        }
    }
}

#[test]
fn markdown_links_resolve() {
    let mut files = Vec::new();
    markdown_files(repo(), &mut files);
    assert!(
        files.iter().any(|f| f.ends_with("docs/configuration.md")),
        "{files:?}"
    );
    let mut broken = Vec::new();
    let mut checked = 0;
    for file in &files {
        let text = fs::read_to_string(file).unwrap();
        let rel = file.strip_prefix(repo()).unwrap().display().to_string();
        for (target, line) in links(&text) {
            if target.contains("://") || target.starts_with("mailto:") {
                continue;
            }
            checked += 1;
            let (path, anchor) = match target.split_once('#') {
                Some((p, a)) => (p, Some(a)),
                None => (target.as_str(), None),
            };
            let dest = if path.is_empty() {
                file.clone()
            } else {
                file.parent().unwrap().join(path)
            };
            if !dest.exists() {
                broken.push(format!("{rel}:{line}: {target}: no such file"));
                continue;
            }
            if let Some(a) = anchor {
                let md = fs::read_to_string(&dest).unwrap_or_default();
                if !anchors(&md).contains(a) {
                    broken.push(format!(
                        "{rel}:{line}: {target}: no heading with that anchor"
                    ));
                }
            }
        }
    }
    assert!(
        checked > 20,
        "only {checked} links found: is the link parser broken?"
    );
    assert!(broken.is_empty(), "broken links:\n{}", broken.join("\n"));
}

/// The words of the first line in `text` that starts with `prefix`, after
/// the prefix (up to a closing parenthesis, when the list is a bash array).
fn list_after(text: &str, prefix: &str) -> Vec<String> {
    let line = text
        .lines()
        .map(str::trim)
        .find_map(|l| l.strip_prefix(prefix))
        .unwrap_or_else(|| panic!("no line starts with {prefix:?}"));
    let line = line.split(')').next().unwrap_or(line);
    let mut words: Vec<String> = line.split_whitespace().map(str::to_string).collect();
    words.sort();
    words
}

/// The demo installs what it lacks with the package list CI uses, so that a
/// machine that ran the demo also runs the tests: the lists must not drift.
#[test]
fn the_demo_installs_the_ci_packages() {
    let ci = list_after(&read(".ci/run"), "apt-get install -y ");
    let demo = list_after(&read("deploy/demo/common.sh"), "DEMO_APT_PACKAGES=(");
    assert!(ci.contains(&"openssh-server".to_string()), "{ci:?}");
    assert_eq!(
        demo, ci,
        "deploy/demo/common.sh DEMO_APT_PACKAGES differs from .ci/run's apt-get install"
    );
}

/// Every access record field is in operations.md's table, and the table
/// names no field the record does not write: people parse these lines.
#[test]
fn every_access_record_field_is_documented() {
    let doc = read("docs/operations.md");
    let start = doc
        .find("### The access log")
        .expect("the access log section");
    let section = &doc[start..];
    let end = section[4..].find("\n### ").map_or(section.len(), |e| e + 4);
    let section = &section[..end];
    let documented: BTreeSet<String> = section
        .lines()
        .filter_map(|l| l.strip_prefix("| `"))
        .filter_map(|l| l.split_once('`').map(|(f, _)| f.to_string()))
        .collect();
    let written: BTreeSet<String> = tunneler::ACCESS_LOG_FIELDS
        .iter()
        .filter(|f| **f != "message")
        .map(|f| f.to_string())
        .collect();
    assert_eq!(documented, written, "docs/operations.md access log fields");
}
