# simplevpn %post ($1: 1 on install, 2 on upgrade): the service users, this
# host's key, then systemd learns of the new units. Nothing is enabled or started: edit
# /etc/simplevpn/simplevpnd.toml, then: systemctl enable --now simplevpnd
if command -v systemd-sysusers >/dev/null 2>&1; then
    systemd-sysusers /usr/lib/sysusers.d/simplevpn.conf
else
    if ! getent passwd simplevpn >/dev/null; then
        useradd --system --user-group --no-create-home --home-dir /nonexistent \
            --shell /sbin/nologin --comment "simplevpn VPN daemon" simplevpn
    fi
    if ! getent passwd simplevpn-helper >/dev/null; then
        useradd --system --user-group --no-create-home --home-dir /nonexistent \
            --shell /sbin/nologin --comment "simplevpn privileged helper" simplevpn-helper
    fi
fi
# This host's key, made once: the default config serves TLS with it. It is
# no file of the package: rpm -e leaves it, as it does ssh's host keys.
if [ ! -e /etc/simplevpn/host.key ]; then
    pub=$(simplevpnd keygen /etc/simplevpn/host.key)
    echo "simplevpn: made /etc/simplevpn/host.key; its public key, for the other side to pin: $pub"
fi
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload || :
fi
