//! simplevpn-gen-assets: writes the man pages and shell completions of
//! simplevpnd and svpnctl, generated from their clap definitions, into a
//! folder (default target/assets) for the packages. Not installed itself.
//!
//! ```text
//! target/assets/man/simplevpnd.8 simplevpnd-server.8 simplevpnd-client.8
//!                   svpnctl.1 svpnctl-status.1 ... svpnctl-watch.1
//!                   simplevpnd.toml.5 (from docs/config.md's field tables)
//! target/assets/completions/bash/simplevpnd  zsh/_simplevpnd  fish/simplevpnd.fish
//! ```

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::{Command, CommandFactory};
use clap_complete::Shell;
use clap_mangen::Man;
use roff::{bold, italic, roman, Inline, Roff};
use simplevpn::config::{DEFAULT_CONFIG_PATH, DEFAULT_CONTROL_SOCKET};

/// One program: its command line, man section, and the sections written
/// after the generated ones on its main page.
struct Program {
    cmd: Command,
    section: &'static str,
    manual: &'static str,
    extra: Vec<Section>,
}

/// A man page section: a heading and paragraphs (tagged ones are `.TP`).
struct Section {
    heading: &'static str,
    paragraphs: Vec<Paragraph>,
}

enum Paragraph {
    Text(Vec<Inline>),
    Tagged(Vec<Inline>, Vec<Inline>),
}

fn main() -> Result<()> {
    let out = match std::env::args_os().nth(1) {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/assets"),
    };
    if std::env::args_os().len() > 2 {
        bail!("usage: simplevpn-gen-assets [OUT_DIR]   (default: target/assets)");
    }
    for program in [simplevpnd(), svpnctl()] {
        man_pages(&program, &out.join("man"))?;
        completions(program.cmd, &out.join("completions"))?;
    }
    write(
        &out.join("man/simplevpnd.toml.5"),
        config_page(CONFIG_MD).as_bytes(),
    )?;
    println!("wrote man pages and completions to {}", out.display());
    Ok(())
}

/// The main page of `program` with its extra sections, and one page per
/// subcommand (`simplevpnd-server.8`), as `clap_mangen::generate_to` names them.
fn man_pages(program: &Program, dir: &Path) -> Result<()> {
    fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    let mut cmd = program.cmd.clone().disable_help_subcommand(true);
    cmd.build();
    let source = format!("simplevpn {}", env!("CARGO_PKG_VERSION"));
    let page = |cmd: Command| {
        Man::new(cmd)
            .section(program.section)
            .source(source.clone())
            .manual(program.manual)
    };

    let mut text = Vec::new();
    page(cmd.clone()).render(&mut text)?;
    let mut roff = Roff::new();
    for section in &program.extra {
        roff.control("SH", [section.heading]);
        for paragraph in &section.paragraphs {
            match paragraph {
                Paragraph::Text(inlines) => {
                    roff.control("PP", []).text(inlines.clone());
                }
                Paragraph::Tagged(tag, body) => {
                    roff.control("TP", []).text(tag.clone()).text(body.clone());
                }
            }
        }
    }
    roff.to_writer(&mut text)?;
    write(
        &dir.join(format!("{}.{}", cmd.get_name(), program.section)),
        &text,
    )?;

    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        let man = page(sub.clone());
        let mut text = Vec::new();
        man.render(&mut text)?;
        write(&dir.join(man.get_filename()), &text)?;
    }
    Ok(())
}

/// Bash, zsh and fish completions for `cmd`, each in its shell's folder.
fn completions(mut cmd: Command, dir: &Path) -> Result<()> {
    let name = cmd.get_name().to_string();
    for (shell, sub) in [
        (Shell::Bash, "bash"),
        (Shell::Zsh, "zsh"),
        (Shell::Fish, "fish"),
    ] {
        let dir = dir.join(sub);
        fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
        let file = clap_complete::generate_to(shell, &mut cmd, &name, &dir)
            .with_context(|| format!("write the {sub} completion of {name}"))?;
        // bash-completion looks a command up by its plain name.
        if shell == Shell::Bash {
            fs::rename(&file, dir.join(&name))
                .with_context(|| format!("rename {}", file.display()))?;
        }
    }
    Ok(())
}

fn write(path: &Path, text: &[u8]) -> Result<()> {
    fs::write(path, text).with_context(|| format!("write {}", path.display()))
}

fn text(inlines: impl Into<Vec<Inline>>) -> Paragraph {
    Paragraph::Text(inlines.into())
}

fn tagged(tag: impl Into<Vec<Inline>>, body: impl Into<Vec<Inline>>) -> Paragraph {
    Paragraph::Tagged(tag.into(), body.into())
}

/// The config reference the man page is made from: the same tables
/// tests/docs.rs checks against the code.
const CONFIG_MD: &str = include_str!("../../docs/config.md");

/// Markdown inline text as plain text: backticks and emphasis dropped,
/// links as their text.
fn plain(markdown: &str) -> String {
    let mut out = String::new();
    let mut rest = markdown;
    while let Some(open) = rest.find('[') {
        let (before, after) = rest.split_at(open);
        out.push_str(before);
        // `[text](target)` becomes text; any other bracket stays.
        match after
            .find("](")
            .and_then(|mid| after[mid..].find(')').map(|close| (mid, mid + close)))
        {
            Some((mid, close)) if !after[1..mid].contains('[') => {
                out.push_str(&after[1..mid]);
                rest = &after[close + 1..];
            }
            _ => {
                out.push('[');
                rest = &after[1..];
            }
        }
    }
    out.push_str(rest);
    out.replace('`', "").replace("**", "").replace('*', "")
}

/// simplevpnd.toml(5), from docs/config.md: its introduction, every field
/// table (a section per config table, a tagged paragraph per field with
/// its default, flag and reload class), and its complete example.
fn config_page(markdown: &str) -> String {
    let mut roff = Roff::new();
    let date = "";
    roff.control(
        "TH",
        [
            "simplevpnd.toml",
            "5",
            date,
            &format!("simplevpn {}", env!("CARGO_PKG_VERSION")),
            "File Formats",
        ],
    );
    roff.control("SH", ["NAME"]).text([roman(
        "simplevpnd.toml - the configuration file of simplevpnd",
    )]);
    roff.control("SH", ["SYNOPSIS"]).text([
        italic(DEFAULT_CONFIG_PATH),
        roman(", "),
        italic("/etc/simplevpn/NAME.toml"),
    ]);
    roff.control("SH", ["DESCRIPTION"]);
    let mut section: Option<String> = None;
    let mut columns: Vec<String> = Vec::new();
    let mut in_code = false;
    let mut example = false;
    let mut intro = true;
    let mut paragraph = String::new();
    let flush = |roff: &mut Roff, paragraph: &mut String| {
        if !paragraph.trim().is_empty() {
            roff.control("PP", [])
                .text([roman(plain(paragraph.trim()))]);
        }
        paragraph.clear();
    };
    for line in markdown.lines() {
        if line.starts_with("```") {
            in_code = !in_code;
            if intro || example {
                flush(&mut roff, &mut paragraph);
                match in_code {
                    true => roff.control("PP", []).control("nf", []),
                    false => roff.control("fi", []),
                };
            }
            continue;
        }
        if in_code {
            if intro || example {
                roff.text([roman(line)]);
            }
            continue;
        }
        if let Some(heading) = line.strip_prefix("## ") {
            flush(&mut roff, &mut paragraph);
            intro = false;
            example = heading.starts_with("A complete example");
            columns.clear();
            section = heading
                .split('`')
                .nth(1)
                .filter(|s| s.starts_with('['))
                .map(str::to_string);
            match (&section, example) {
                (Some(name), _) => {
                    roff.control("SH", [name.as_str()]);
                }
                (None, true) => {
                    roff.control("SH", ["EXAMPLES"]);
                }
                (None, false) => {}
            }
            continue;
        }
        if line.starts_with('#') {
            continue;
        }
        if !intro && !example && section.is_none() {
            continue;
        }
        if !line.starts_with('|') {
            // Prose: the introduction, a section's, the example's; a list
            // item is a paragraph of its own.
            if line.trim().is_empty() || line.starts_with("- ") {
                flush(&mut roff, &mut paragraph);
            }
            paragraph.push_str(line.trim());
            paragraph.push(' ');
            continue;
        }
        flush(&mut roff, &mut paragraph);
        let cells: Vec<String> = line
            .trim()
            .trim_matches('|')
            .split(" | ")
            .map(|c| c.trim().to_string())
            .collect();
        if cells.first().is_some_and(|c| c == "field") {
            columns = cells;
            continue;
        }
        if columns.is_empty() || line.chars().all(|c| matches!(c, '|' | '-' | ':' | ' ')) {
            continue;
        }
        let cell = |name: &str| {
            columns
                .iter()
                .position(|c| c == name)
                .and_then(|at| cells.get(at))
                .map_or_else(String::new, |c| plain(c))
        };
        let flag = match cell("flag").as_str() {
            "—" | "" => String::new(),
            flag => format!("; flag {flag}"),
        };
        roff.control("TP", []).text([bold(cell("field"))]).text([
            roman(format!(
                "Default {}{flag}; on reload: {}. ",
                cell("default"),
                cell("reload")
            )),
            roman(cell("what it does")),
        ]);
    }
    flush(&mut roff, &mut paragraph);
    for s in [see_also(&["simplevpnd(8)", "svpnctl(1)"])] {
        roff.control("SH", [s.heading]);
        for paragraph in s.paragraphs {
            if let Paragraph::Text(inlines) = paragraph {
                roff.control("PP", []).text(inlines);
            }
        }
    }
    roff.to_roff()
}

fn see_also(pages: &[&str]) -> Section {
    let mut inlines = Vec::new();
    for (i, page) in pages.iter().enumerate() {
        if i > 0 {
            inlines.push(roman(", "));
        }
        let (name, section) = page.split_once('(').unwrap_or((page, ""));
        inlines.push(bold(name));
        inlines.push(roman(format!("({section}")));
    }
    Section {
        heading: "SEE ALSO",
        paragraphs: vec![text(inlines)],
    }
}

fn simplevpnd() -> Program {
    Program {
        cmd: simplevpn::daemon::cli::Cli::command(),
        section: "8",
        manual: "System Administration",
        extra: vec![
            Section {
                heading: "FILES",
                paragraphs: vec![
                    tagged(
                        [italic(DEFAULT_CONFIG_PATH)],
                        [roman(
                            "The config file read when --config is not given, if it exists. \
                             Its [server] or [client] table sets the role when no subcommand is \
                             given; [control] sets the control socket and its groups. Unknown \
                             fields are rejected; flags override the file.",
                        )],
                    ),
                    tagged(
                        [italic("/etc/simplevpn/host.key")],
                        [
                            roman(
                                "This host's private key (mode 0600), made when the package \
                                   was installed and named by key = in the default config; ",
                            ),
                            bold("simplevpnd pubkey /etc/simplevpn/host.key"),
                            roman(" prints the public key that the other side pins."),
                        ],
                    ),
                    tagged(
                        [italic("/etc/simplevpn/NAME.toml")],
                        [
                            roman("The config of the instance "),
                            bold("simplevpnd@NAME.service"),
                            roman(", whose control socket is /run/simplevpn/NAME.sock."),
                        ],
                    ),
                    tagged(
                        [italic("/usr/libexec/simplevpn/simplevpn-helper")],
                        [roman(
                            "The privileged helper (or simplevpn-helper beside simplevpnd): \
                             simplevpnd starts it as root, then drops to the service user \
                             (--user, default simplevpn) with no capabilities; the helper \
                             keeps only CAP_NET_ADMIN to create and configure the tun.",
                        )],
                    ),
                    tagged(
                        [italic(DEFAULT_CONTROL_SOCKET)],
                        [
                            roman("The control socket (mode 0660, group simplevpn) that "),
                            bold("svpnctl"),
                            roman(" talks to."),
                        ],
                    ),
                ],
            },
            Section {
                heading: "SYSTEMD",
                paragraphs: vec![text([
                    bold("simplevpnd.service"),
                    roman(" runs the daemon with "),
                    italic(DEFAULT_CONFIG_PATH),
                    roman("; "),
                    bold("simplevpnd@NAME.service"),
                    roman(
                        " runs one per /etc/simplevpn/NAME.toml. Under systemd the daemon \
                         reports READY=1 once it serves (a client: once started; it keeps \
                         reconnecting), a STATUS= line such as \"serving 3 peers on \
                         0.0.0.0:2002\" or \"connected to HOST as ADDRESS\" (see systemctl \
                         status), and pings the watchdog from its event loop.",
                    ),
                ])],
            },
            Section {
                heading: "SIGNALS",
                paragraphs: vec![
                    tagged(
                        [bold("SIGTERM"), roman(", "), bold("SIGINT")],
                        [roman(
                            "Close every connection, remove the tun device and the control \
                             socket (the helper undoes its routes, NAT and DNS changes), and \
                             exit with status 0.",
                        )],
                    ),
                    tagged(
                        [bold("SIGHUP")],
                        [
                            roman(
                                "A server re-reads its config file and applies the difference \
                                 without dropping anyone, as ",
                            ),
                            bold("svpnctl reload"),
                            roman(
                                " does; a bad file, or a change that needs a restart, is \
                                 refused and logged, and the running configuration stays. A \
                                 client ignores it.",
                            ),
                        ],
                    ),
                ],
            },
            Section {
                heading: "EXAMPLES",
                paragraphs: vec![
                    tagged(
                        [bold(
                            "simplevpnd check --config /etc/simplevpn/simplevpnd.toml",
                        )],
                        [roman(
                            "Check a config as a start would, without starting anything: \
                             exit 0 and a one-line summary, or 2 and each problem with its \
                             file and line.",
                        )],
                    ),
                    tagged(
                        [bold("simplevpnd keygen /etc/simplevpn/host.key")],
                        [roman(
                            "Make this host's key (mode 0600) and print its public key, \
                             which the other side pins; keygen - | pubkey - works too.",
                        )],
                    ),
                    tagged(
                        [bold(
                            "simplevpnd server --key /etc/simplevpn/host.key --peer PUBKEY \
                             --network 10.0.0.0/24",
                        )],
                        [roman("A server that lets one TLS client in.")],
                    ),
                    tagged(
                        [bold(
                            "simplevpnd client -s vpn.example.org:2002 --key \
                             /etc/simplevpn/host.key --server-key PUBKEY --full-tunnel",
                        )],
                        [roman(
                            "A client sending all its traffic through that server (if it \
                             offers itself as the gateway).",
                        )],
                    ),
                    tagged(
                        [bold("systemctl enable --now simplevpnd@office")],
                        [roman(
                            "One more daemon, configured by /etc/simplevpn/office.toml, with \
                             its control socket at /run/simplevpn/office.sock.",
                        )],
                    ),
                ],
            },
            Section {
                heading: "EXIT STATUS",
                paragraphs: vec![
                    tagged([bold("0")], [roman("Stopped by SIGTERM or SIGINT.")]),
                    tagged(
                        [bold("1")],
                        [roman(
                            "A failure while running (tun device, listen address, ...).",
                        )],
                    ),
                    tagged(
                        [bold("2")],
                        [roman(
                            "A bad flag or config value, named in one line on stderr.",
                        )],
                    ),
                ],
            },
            see_also(&[
                "simplevpnd.toml(5)",
                "svpnctl(1)",
                "simplevpnd-server(8)",
                "simplevpnd-client(8)",
                "systemctl(1)",
            ]),
        ],
    }
}

fn svpnctl() -> Program {
    Program {
        cmd: simplevpn::ctl::cli::Cli::command(),
        section: "1",
        manual: "User Commands",
        extra: vec![
            Section {
                heading: "EXIT STATUS",
                paragraphs: vec![
                    tagged([bold("0")], [roman("Success.")]),
                    tagged(
                        [bold("1")],
                        [roman(
                            "A failure: no daemon at the socket, no such peer, no permission.",
                        )],
                    ),
                    tagged([bold("2")], [roman("A usage error.")]),
                ],
            },
            Section {
                heading: "EXAMPLES",
                paragraphs: vec![
                    tagged(
                        [bold("svpnctl sessions")],
                        [roman(
                            "The live sessions: address, name, remote, traffic (also: peers).",
                        )],
                    ),
                    tagged(
                        [bold("svpnctl inspect laptop")],
                        [roman(
                            "One session in detail, by its name, key or tunnel address.",
                        )],
                    ),
                    tagged(
                        [bold("svpnctl kick laptop --ban 1h")],
                        [roman(
                            "Close it and refuse its key for an hour; svpnctl bans lists \
                                the bans, svpnctl unban lifts one.",
                        )],
                    ),
                    tagged(
                        [bold("svpnctl peer new laptop --output laptop.toml")],
                        [roman(
                            "A key pair for a new client, allowed at once, and its whole \
                             config in laptop.toml (mode 0600).",
                        )],
                    ),
                    tagged(
                        [bold("svpnctl keys")],
                        [roman(
                            "Every allowed key, from the file or added live (also: peer list).",
                        )],
                    ),
                    tagged(
                        [bold("svpnctl --socket /run/simplevpn/office.sock reload")],
                        [roman(
                            "Re-read the config of simplevpnd@office and apply the difference.",
                        )],
                    ),
                    tagged(
                        [bold("svpnctl --json status")],
                        [roman("The same as JSON, for scripts.")],
                    ),
                ],
            },
            Section {
                heading: "PERMISSIONS",
                paragraphs: vec![text([roman(
                    "Whoever can open the socket (root and the members of its group, \
                     simplevpn by default) may read; kick is allowed for root, the daemon's \
                     own user and the members of the daemon's [control] admin_group.",
                )])],
            },
            Section {
                heading: "FILES",
                paragraphs: vec![
                    tagged(
                        [italic(DEFAULT_CONTROL_SOCKET)],
                        [roman("The control socket of simplevpnd.service.")],
                    ),
                    tagged(
                        [italic("/run/simplevpn/NAME.sock")],
                        [roman("The control socket of simplevpnd@NAME.service.")],
                    ),
                ],
            },
            see_also(&["simplevpnd(8)", "simplevpnd.toml(5)"]),
        ],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markdown_becomes_plain_text() {
        assert_eq!(
            plain("`tun` (see [IPv6](ipv6.md#x)), **live** and [not a link"),
            "tun (see IPv6), live and [not a link"
        );
    }

    #[test]
    fn the_config_page_has_every_table_its_fields_and_the_example() {
        let page = config_page(CONFIG_MD);
        for section in [
            "[server]",
            "[[server.peer]]",
            "[metrics]",
            "[cluster]",
            "[client]",
            "[control]",
            "EXAMPLES",
            "\"SEE ALSO\"",
        ] {
            assert!(page.contains(&format!(".SH {section}")), "{section}");
        }
        // A row: the field tagged, then its default, flag and reload class.
        assert!(
            page.contains(
                ".TP\n\\fBtun\\fR\nDefault svpn0; under simplevpnd@NAME, svpn\\-NAME \
                 (cut to 15 bytes); flag \\-\\-tun; on reload: restart."
            ),
            "{page}"
        );
        // The complete example, verbatim.
        assert!(page.contains(".nf\n[server]\n"), "{page}");
        assert!(!page.contains('`'), "markdown left in the page");
    }
}
