//! What a reload does with each setting of a server's config: one table,
//! [`SERVER_SETTINGS`], that lists every field of `[server]`,
//! `[[server.peer]]`, `[metrics]` and `[cluster]` once with its
//! [`Reload`] class. The running server refuses a reload that changes a
//! [`Reload::Restart`] setting, naming each field ([`restart_fields`]), and
//! applies the rest; docs/config.md's reload column is checked against the
//! same table (tests/docs.rs).

use crate::config::ServerConfig;

/// How a changed setting takes effect on a reload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reload {
    /// Applied at once: connected clients see the change (pushed to
    /// extension clients; peers no longer allowed are disconnected).
    Live,
    /// The reload is refused, naming the field; the running configuration
    /// stays in force until a restart.
    Restart,
}

impl Reload {
    /// The words docs/config.md's reload column uses for this class.
    pub fn documented_as(self) -> &'static str {
        match self {
            Reload::Live => "live",
            Reload::Restart => "restart",
        }
    }
}

/// The config tables a server reloads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Section {
    Server,
    ServerPeer,
    Metrics,
    Cluster,
}

impl Section {
    /// The table's name as written in docs/config.md's headings.
    pub fn heading(self) -> &'static str {
        match self {
            Section::Server => "[server]",
            Section::ServerPeer => "[[server.peer]]",
            Section::Metrics => "[metrics]",
            Section::Cluster => "[cluster]",
        }
    }
}

/// One setting of the running server: the config fields that make it (as
/// written in the file), how a change reloads, and whether two configs
/// differ in it.
pub struct Setting {
    pub section: Section,
    /// The fields as written in the file; `None`: every field of the
    /// section (`[cluster]`, which changes only as a whole).
    pub fields: Option<&'static [&'static str]>,
    pub class: Reload,
    differs: fn(&ServerConfig, &ServerConfig) -> bool,
}

impl Setting {
    /// Whether `old` and `new` differ in this setting.
    pub fn differs(&self, old: &ServerConfig, new: &ServerConfig) -> bool {
        (self.differs)(old, new)
    }

    /// The name a refusal gives this setting: its first field, or the
    /// section's for a whole section.
    pub fn name(&self) -> &'static str {
        match (self.fields, self.section) {
            (Some(fields), _) => fields.first().copied().unwrap_or("?"),
            (None, Section::Cluster) => "cluster",
            (None, Section::Metrics) => "metrics",
            (None, Section::ServerPeer) => "peer",
            (None, Section::Server) => "server",
        }
    }
}

/// A setting made of one field of the same name in the file and in
/// [`ServerConfig`].
macro_rules! setting {
    ($section:ident, $field:ident, $class:ident) => {
        Setting {
            section: Section::$section,
            fields: Some(&[stringify!($field)]),
            class: Reload::$class,
            differs: |old, new| old.$field != new.$field,
        }
    };
    ($section:ident, [$($name:literal),+], $field:ident, $class:ident) => {
        Setting {
            section: Section::$section,
            fields: Some(&[$($name),+]),
            class: Reload::$class,
            differs: |old, new| old.$field != new.$field,
        }
    };
}

/// Every setting of a server, each once. Adding a field to
/// [`ServerConfig`] fails to compile [`restart_fields`] until it is listed
/// here; adding one to the file's tables fails tests/docs.rs and this
/// module's tests until it is.
pub const SERVER_SETTINGS: &[Setting] = &[
    setting!(Server, listen, Restart),
    setting!(Server, port_share, Restart),
    setting!(Server, ["port_share_proxy"], port_share, Restart),
    setting!(Server, network, Restart),
    setting!(Server, network6, Restart),
    setting!(Server, tun, Restart),
    setting!(Server, client_timeout, Restart),
    setting!(Server, handshake_timeout, Restart),
    setting!(Server, first_bytes_timeout, Restart),
    setting!(Server, mtu, Restart),
    setting!(Server, legacy_mtu, Restart),
    setting!(Server, max_frame, Restart),
    setting!(Server, queue_len, Restart),
    setting!(Server, queue_bytes, Restart),
    setting!(Server, memory_budget, Restart),
    setting!(Server, frame_timeout, Restart),
    setting!(Server, user, Restart),
    setting!(Server, helper_user, Restart),
    setting!(Server, key, Restart),
    setting!(Server, ["legacy", "legacy_allow"], legacy, Restart),
    setting!(Server, ["peer"], peers, Live),
    setting!(Server, max_unauthenticated, Restart),
    setting!(Server, max_unauthenticated_per_source, Restart),
    setting!(Server, endpoint, Restart),
    setting!(Server, client_to_client, Restart),
    setting!(Server, max_unauthenticated_per_network, Restart),
    setting!(Server, unauthenticated_reserve, Restart),
    setting!(Server, legacy_max_per_source, Restart),
    setting!(Server, routes, Live),
    setting!(Server, state_dir, Restart),
    setting!(Server, lease_time, Restart),
    setting!(Server, gateway, Live),
    setting!(Server, masquerade, Restart),
    setting!(Server, forwarding, Restart),
    setting!(Server, dns, Live),
    setting!(Server, dns_search, Live),
    setting!(Server, workers, Restart),
    // A peer's entry is live as a whole: a changed entry disconnects that
    // peer once, and it reconnects with the new one.
    setting!(
        ServerPeer,
        [
            "key",
            "name",
            "address",
            "address6",
            "client_to_client",
            "routes"
        ],
        peers,
        Live
    ),
    setting!(Metrics, ["listen", "public"], metrics, Restart),
    Setting {
        section: Section::Cluster,
        fields: None,
        class: Reload::Restart,
        differs: |old, new| old.cluster != new.cluster,
    },
];

/// The fields that differ between `old` and `new` and that a running
/// server cannot take over: a reload refuses them, naming each.
pub fn restart_fields(old: &ServerConfig, new: &ServerConfig) -> Vec<&'static str> {
    // Every field of ServerConfig, by name: a new one does not compile
    // until it is given a setting above.
    let ServerConfig {
        listen: _,
        network: _,
        network6: _,
        tun: _,
        client_timeout: _,
        handshake_timeout: _,
        first_bytes_timeout: _,
        mtu: _,
        legacy_mtu: _,
        max_frame: _,
        queue_len: _,
        queue_bytes: _,
        memory_budget: _,
        frame_timeout: _,
        user: _,
        helper_user: _,
        key: _,
        peers: _,
        legacy: _,
        max_unauthenticated: _,
        max_unauthenticated_per_source: _,
        client_to_client: _,
        endpoint: _,
        max_unauthenticated_per_network: _,
        unauthenticated_reserve: _,
        legacy_max_per_source: _,
        routes: _,
        state_dir: _,
        lease_time: _,
        metrics: _,
        gateway: _,
        masquerade: _,
        forwarding: _,
        dns: _,
        dns_search: _,
        cluster: _,
        workers: _,
        port_share: _,
    } = old;
    let mut fields: Vec<&'static str> = SERVER_SETTINGS
        .iter()
        .filter(|s| s.class == Reload::Restart && s.differs(old, new))
        .map(Setting::name)
        .collect();
    fields.dedup();
    fields
}

/// How a reload treats `field` of `section`, if the table lists it.
pub fn class_of(section: Section, field: &str) -> Option<Reload> {
    SERVER_SETTINGS
        .iter()
        .find(|s| s.section == section && s.fields.is_none_or(|f| f.contains(&field)))
        .map(|s| s.class)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;
    use crate::cluster::config::ClusterSection;
    use crate::config::{MetricsSection, PeerSection, ServerSection};
    use serde_aux::serde_introspection::serde_introspect;

    fn listed(section: Section) -> BTreeSet<&'static str> {
        SERVER_SETTINGS
            .iter()
            .filter(|s| s.section == section)
            .flat_map(|s| s.fields.unwrap_or(&[]).iter().copied())
            .collect()
    }

    #[test]
    fn every_field_of_the_file_is_listed_once() {
        let mut server: BTreeSet<&str> = serde_introspect::<ServerSection>()
            .iter()
            .copied()
            .collect();
        // Read by the server from [metrics]; in [server] only as flags.
        server.remove("metrics");
        server.remove("metrics_public");
        assert_eq!(listed(Section::Server), server);
        let peer: BTreeSet<&str> = serde_introspect::<PeerSection>().iter().copied().collect();
        assert_eq!(listed(Section::ServerPeer), peer);
        let metrics: BTreeSet<&str> = serde_introspect::<MetricsSection>()
            .iter()
            .copied()
            .collect();
        assert_eq!(listed(Section::Metrics), metrics);
        for field in serde_introspect::<ClusterSection>() {
            assert_eq!(class_of(Section::Cluster, field), Some(Reload::Restart));
        }
        let mut seen = BTreeSet::new();
        for setting in SERVER_SETTINGS {
            for field in setting.fields.unwrap_or(&[]) {
                assert!(
                    seen.insert((setting.section, *field)),
                    "{} {field} is listed twice",
                    setting.section.heading()
                );
            }
        }
    }

    #[test]
    fn each_field_has_its_class() {
        use Reload::*;
        for (field, class) in [
            ("dns", Live),
            ("dns_search", Live),
            ("gateway", Live),
            ("routes", Live),
            ("peer", Live),
            ("network", Restart),
            ("listen", Restart),
            ("masquerade", Restart),
            ("memory_budget", Restart),
            ("queue_bytes", Restart),
            ("frame_timeout", Restart),
            ("legacy_allow", Restart),
        ] {
            assert_eq!(class_of(Section::Server, field), Some(class), "{field}");
        }
        assert_eq!(class_of(Section::ServerPeer, "routes"), Some(Live));
        assert_eq!(class_of(Section::Metrics, "public"), Some(Restart));
        assert_eq!(class_of(Section::Cluster, "etcd"), Some(Restart));
        assert_eq!(class_of(Section::Server, "no_such_field"), None);
    }

    #[test]
    fn a_reload_names_what_needs_a_restart_and_nothing_live() {
        let old = crate::config::ConfigFile::parse(
            "[server]\nlegacy = true\n",
            std::path::Path::new("test.toml"),
        )
        .expect("parse")
        .server
        .expect("server")
        .resolve()
        .expect("valid");
        let mut new = old.clone();
        new.dns = vec!["198.18.0.53".parse().expect("ip")];
        new.dns_search = vec!["corp.example".into()];
        new.gateway = !old.gateway;
        new.routes = vec!["198.19.128.0/24".parse().expect("net")];
        assert!(restart_fields(&old, &new).is_empty());
        new.network = "198.19.0.0/24".parse().expect("net");
        new.masquerade = !old.masquerade;
        new.memory_budget += 1;
        assert_eq!(
            restart_fields(&old, &new),
            ["network", "memory_budget", "masquerade"]
        );
    }
}
