//! The docs kept in step with the code: the README stays short and gives
//! the two commands a newcomer needs, every relative link leads somewhere,
//! and docs/config.md lists exactly the config fields and flags the code
//! has (field names from the serde structs, flags from the clap
//! definitions, so a new field without its docs fails here).

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

use clap::CommandFactory;
use serde_aux::serde_introspection::serde_introspect;
use simplevpn::cluster::config::ClusterSection;
use simplevpn::config::{
    ClientSection, ConfigFile, ControlSection, MetricsSection, PeerSection, ServerSection,
};
use simplevpn::daemon::cli::Cli;
use simplevpn::reload::{class_of, Section};

/// The README's size limit, in bytes.
const README_MAX_BYTES: usize = 15_000;
/// How many lines of the README count as its first screen.
const FIRST_SCREEN_LINES: usize = 25;
/// The demo and test commands, as the README gives them (CI runs the same
/// test command).
const DEMO: &str = "sudo scripts/demo";
const TEST: &str = "sudo scripts/test";

/// Docs linked before they exist, because another change is writing them.
/// Remove an entry once its file is in the tree.
const PENDING: &[&str] = &[];

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(path: &Path) -> String {
    fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The lines of `text` outside fenced code blocks.
fn prose(text: &str) -> Vec<&str> {
    let mut fenced = false;
    text.lines()
        .filter(|line| {
            if line.trim_start().starts_with("```") {
                fenced = !fenced;
                return false;
            }
            !fenced
        })
        .collect()
}

#[test]
fn the_readme_is_short_and_starts_with_the_demo_and_test_commands() {
    let readme = read(&root().join("README.md"));
    assert!(
        readme.len() < README_MAX_BYTES,
        "README.md is {} bytes; keep it under {README_MAX_BYTES} (move detail to docs/)",
        readme.len()
    );
    let first_screen = readme
        .lines()
        .take(FIRST_SCREEN_LINES)
        .collect::<Vec<_>>()
        .join("\n");
    for command in [DEMO, TEST] {
        assert!(
            first_screen.contains(command),
            "README.md's first {FIRST_SCREEN_LINES} lines do not give `{command}`"
        );
    }
    let ci = read(&root().join(".ci/run"));
    assert!(
        ci.contains("scripts/test"),
        ".ci/run no longer runs the README's test command, scripts/test"
    );
}

/// The markdown files whose links are checked.
fn markdown_files() -> Vec<PathBuf> {
    let root = root();
    let mut files = vec![
        root.join("README.md"),
        root.join("CHANGELOG.md"),
        root.join("bench/results/history.md"),
    ];
    let mut docs = fs::read_dir(root.join("docs"))
        .expect("docs/")
        .map(|entry| entry.expect("docs/ entry").path())
        .filter(|path| path.extension().is_some_and(|e| e == "md"))
        .collect::<Vec<_>>();
    docs.sort();
    files.extend(docs);
    files
}

/// The targets of the inline links `[text](target)` in `text`, outside
/// code blocks.
fn links(text: &str) -> Vec<String> {
    let mut found = Vec::new();
    for line in prose(text) {
        let mut rest = line;
        while let Some(at) = rest.find("](") {
            rest = &rest[at + 2..];
            if let Some(end) = rest.find(')') {
                found.push(rest[..end].to_string());
                rest = &rest[end..];
            }
        }
    }
    found
}

/// GitHub's anchor for a heading: lower case, punctuation dropped, spaces
/// as hyphens.
fn slug(heading: &str) -> String {
    heading
        .trim()
        .chars()
        .filter_map(|c| match c {
            ' ' => Some('-'),
            c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c.to_ascii_lowercase()),
            _ => None,
        })
        .collect()
}

/// The anchors of every heading in `text`, with GitHub's `-1`, `-2`, ...
/// for repeated ones.
fn anchors(text: &str) -> BTreeSet<String> {
    let mut seen = BTreeMap::<String, usize>::new();
    let mut anchors = BTreeSet::new();
    for line in prose(text) {
        let Some(heading) = line.strip_prefix('#') else {
            continue;
        };
        let heading = heading.trim_start_matches('#');
        if !heading.starts_with(' ') {
            continue;
        }
        let base = slug(heading);
        let count = seen.entry(base.clone()).or_insert(0);
        anchors.insert(match *count {
            0 => base,
            n => format!("{base}-{n}"),
        });
        *count += 1;
    }
    anchors
}

#[test]
fn every_relative_link_in_the_docs_leads_to_a_file_and_heading_that_exist() {
    let root = root();
    let mut broken = Vec::new();
    for file in markdown_files() {
        let text = read(&file);
        let dir = file.parent().expect("a file's directory");
        for link in links(&text) {
            if link.contains("://") || link.starts_with("mailto:") {
                continue;
            }
            let (path, anchor) = link.split_once('#').unwrap_or((&link, ""));
            let target = match path {
                "" => file.clone(),
                path => dir.join(path),
            };
            let shown = format!("{}: ({link})", file.strip_prefix(&root).unwrap().display());
            if !target.exists() {
                let pending = PENDING.iter().any(|p| root.join(p) == normalize(&target));
                if !pending {
                    broken.push(format!("{shown}: no such file"));
                }
                continue;
            }
            if !anchor.is_empty()
                && target.extension().is_some_and(|e| e == "md")
                && !anchors(&read(&target)).contains(anchor)
            {
                broken.push(format!("{shown}: no heading #{anchor}"));
            }
        }
    }
    assert!(broken.is_empty(), "broken links:\n{}", broken.join("\n"));
}

/// `path` with its `..` and `.` parts resolved (it need not exist).
fn normalize(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for part in path.components() {
        match part {
            std::path::Component::ParentDir => {
                out.pop();
            }
            std::path::Component::CurDir => {}
            other => out.push(other),
        }
    }
    out
}

/// One row of a field table in docs/config.md.
#[derive(Debug)]
struct Row {
    field: String,
    flag: String,
    reload: String,
}

/// docs/config.md's field tables, by section (`[server]`,
/// `[[server.peer]]`, ...): a heading naming the section in backticks,
/// then a table whose header starts with `| field |`.
fn documented() -> BTreeMap<String, Vec<Row>> {
    let text = read(&root().join("docs/config.md"));
    let mut sections = BTreeMap::<String, Vec<Row>>::new();
    let mut section = None::<String>;
    let mut columns = Vec::<String>::new();
    for line in prose(&text) {
        if line.starts_with('#') {
            section = line
                .split('`')
                .nth(1)
                .filter(|s| s.starts_with('['))
                .map(str::to_string);
            columns.clear();
            continue;
        }
        let Some(section) = &section else { continue };
        if !line.starts_with('|') {
            continue;
        }
        let cells = line
            .trim()
            .trim_matches('|')
            .split(" | ")
            .map(|c| c.trim().to_string())
            .collect::<Vec<_>>();
        if cells.first().is_some_and(|c| c == "field") {
            columns = cells;
            continue;
        }
        if columns.is_empty() || line.chars().all(|ch| matches!(ch, '|' | '-' | ':' | ' ')) {
            continue;
        }
        assert_eq!(
            cells.len(),
            columns.len(),
            "docs/config.md {section}: a row's cells do not match the header: {line}"
        );
        let cell = |name: &str| {
            let at = columns
                .iter()
                .position(|c| c == name)
                .unwrap_or_else(|| panic!("docs/config.md {section}: no column {name:?}"));
            cells.get(at).cloned().unwrap_or_default()
        };
        let field = cell("field");
        let name = field
            .strip_prefix('`')
            .and_then(|f| f.strip_suffix('`'))
            .unwrap_or_else(|| {
                panic!("docs/config.md {section}: field {field:?} not in backticks")
            });
        sections.entry(section.clone()).or_default().push(Row {
            field: name.to_string(),
            flag: cell("flag"),
            reload: cell("reload"),
        });
    }
    sections
}

/// Every section the code reads, with the fields its struct accepts.
fn accepted() -> BTreeMap<String, BTreeSet<&'static str>> {
    let tables = serde_introspect::<ConfigFile>();
    let mut sections = BTreeMap::new();
    for &table in tables {
        let fields: &[&str] = match table {
            "server" => serde_introspect::<ServerSection>(),
            "client" => serde_introspect::<ClientSection>(),
            "control" => serde_introspect::<ControlSection>(),
            "metrics" => serde_introspect::<MetricsSection>(),
            "cluster" => serde_introspect::<ClusterSection>(),
            other => panic!(
                "a config table this test does not know: [{other}]; document it and add it here"
            ),
        };
        sections.insert(format!("[{table}]"), fields.iter().copied().collect());
    }
    // `peer` in [server] is the array of tables [[server.peer]].
    assert!(serde_introspect::<ServerSection>().contains(&"peer"));
    sections.insert(
        "[[server.peer]]".to_string(),
        serde_introspect::<PeerSection>().iter().copied().collect(),
    );
    sections
}

#[test]
fn config_md_lists_every_field_the_code_accepts_and_no_other() {
    let documented = documented();
    let accepted = accepted();
    let mut wrong = Vec::new();
    for section in documented.keys() {
        if !accepted.contains_key(section) {
            wrong.push(format!(
                "{section}: documented, but the code has no such table"
            ));
        }
    }
    for (section, fields) in &accepted {
        let rows = documented
            .get(section)
            .map(Vec::as_slice)
            .unwrap_or_default();
        let listed = rows
            .iter()
            .map(|r| r.field.as_str())
            .collect::<BTreeSet<_>>();
        for missing in fields.difference(&listed) {
            wrong.push(format!(
                "{section} {missing}: accepted, but not in docs/config.md"
            ));
        }
        for extra in listed.difference(fields) {
            wrong.push(format!(
                "{section} {extra}: in docs/config.md, but not accepted"
            ));
        }
        if listed.len() != rows.len() {
            wrong.push(format!("{section}: a field is listed twice"));
        }
    }
    assert!(
        wrong.is_empty(),
        "docs/config.md is out of step:\n{}",
        wrong.join("\n")
    );
}

#[test]
fn config_md_says_how_each_field_reloads_as_the_reload_table_does() {
    const NOT_RELOADED: &str = "restart (not reloaded)";
    let reloaded = [
        Section::Server,
        Section::ServerPeer,
        Section::Metrics,
        Section::Cluster,
    ];
    let mut wrong = Vec::new();
    for (section, rows) in documented() {
        let table = reloaded.iter().find(|s| s.heading() == section);
        for row in rows {
            // What the server's reload table says, or for the tables a
            // reload never reads ([client], [control]), that.
            let expected = match table {
                Some(&table) => match class_of(table, &row.field) {
                    Some(class) => class.documented_as(),
                    None => {
                        wrong.push(format!("{section} {}: not in the reload table", row.field));
                        continue;
                    }
                },
                None => NOT_RELOADED,
            };
            if row.reload != expected {
                wrong.push(format!(
                    "{section} {}: docs/config.md says {:?}, the code {expected:?}",
                    row.field, row.reload
                ));
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "docs/config.md's reload column is out of step:\n{}",
        wrong.join("\n")
    );
}

/// The flags (`--long` and `-s`) of `command` and its subcommand `sub`.
fn flags_of(command: &clap::Command, sub: Option<&str>) -> BTreeSet<String> {
    let command = match sub {
        Some(sub) => command.find_subcommand(sub).expect("subcommand"),
        None => command,
    };
    command
        .get_arguments()
        .flat_map(|arg| {
            let long = arg.get_long().map(|l| format!("--{l}"));
            let short = arg.get_short().map(|s| format!("-{s}"));
            long.into_iter().chain(short)
        })
        .filter(|flag| !matches!(flag.as_str(), "--help" | "-h" | "--version" | "-V"))
        .collect()
}

/// The flags a flag cell names: each `--word` or `-x` in backticks.
fn flags_in(cell: &str) -> Vec<String> {
    cell.split('`')
        .skip(1)
        .step_by(2)
        .filter(|code| code.starts_with('-'))
        .map(|code| code.split_whitespace().next().unwrap_or(code).to_string())
        .collect()
}

#[test]
fn config_md_names_only_real_flags_and_every_flag_of_both_roles() {
    let mut cli = Cli::command();
    cli.build();
    let global = flags_of(&cli, None);
    let server = &flags_of(&cli, Some("server")) | &global;
    let client = &flags_of(&cli, Some("client")) | &global;
    let mut wrong = Vec::new();
    let mut named = BTreeSet::new();
    for (section, rows) in documented() {
        let allowed = match section.as_str() {
            "[client]" => &client,
            "[control]" => &global,
            _ => &server,
        };
        for row in rows {
            for flag in flags_in(&row.flag) {
                if !allowed.contains(&flag) {
                    wrong.push(format!("{section} {}: no flag {flag}", row.field));
                }
                named.insert(flag);
            }
        }
    }
    // --config picks the file itself: it sets no field.
    for flag in (&server | &client).difference(&named) {
        if flag != "--config" {
            wrong.push(format!(
                "{flag}: a flag of simplevpnd, but in no table of docs/config.md"
            ));
        }
    }
    assert!(
        wrong.is_empty(),
        "docs/config.md is out of step with the flags:\n{}",
        wrong.join("\n")
    );
}

/// The config file the packages install lists every field of every table
/// (commented out, with its default), so that an admin never needs to look
/// a name up, and says to reload rather than restart after a change.
#[test]
fn the_packaged_config_lists_every_field() {
    let text = std::fs::read_to_string(root().join("packaging/simplevpnd.toml"))
        .expect("packaging/simplevpnd.toml");
    // Each table's fields, in that table's part of the file.
    let part = |header: &str| -> String {
        let start = text
            .lines()
            .position(|l| l.trim_start_matches(['#', ' ']) == header)
            .unwrap_or_else(|| {
                panic!("no {header} table (commented or not) in the packaged config")
            });
        text.lines()
            .skip(start + 1)
            .take_while(|l| {
                let l = l.trim_start_matches(['#', ' ']);
                !(l.starts_with('[') && l.ends_with(']'))
            })
            .collect::<Vec<_>>()
            .join("\n")
    };
    let mut missing = Vec::new();
    for (section, fields) in accepted() {
        let body = part(&section);
        for field in fields {
            if (field == "peer" && section == "[server]")
                || (field == "member" && section == "[cluster]")
            {
                continue; // the [[server.peer]] and [[cluster.member]] tables
            }
            let listed = body.lines().any(|l| {
                l.trim_start_matches(['#', ' '])
                    .split_once('=')
                    .is_some_and(|(k, _)| k.trim() == field)
            });
            if !listed {
                missing.push(format!("{section} {field}"));
            }
        }
    }
    assert!(
        missing.is_empty(),
        "packaging/simplevpnd.toml does not list:\n{}",
        missing.join("\n")
    );
    assert!(
        text.contains("systemctl reload simplevpnd"),
        "say reload, not restart"
    );
}
