# simplevpn %postun ($1: 0 on erase, 1 on upgrade): systemd forgets the
# removed units; an upgrade restarts the daemons that were running, each only
# if `simplevpnd check` passes on its config (else the old one keeps running
# and the reason is printed; the same script as the .deb's). rpm keeps
# a changed config as /etc/simplevpn/simplevpnd.toml.rpmsave, and the host's
# key; the simplevpn user and group stay.
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload || :
    if [ "$1" -ge 1 ]; then
        /usr/libexec/simplevpn/restart-checked || :
    fi
fi
if [ "$1" -eq 0 ]; then
    rmdir /etc/simplevpn /run/simplevpn 2>/dev/null || :
fi
