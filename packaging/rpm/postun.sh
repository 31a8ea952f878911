# simplevpn %postun ($1: 0 on erase, 1 on upgrade): systemd forgets the
# removed units; an upgrade restarts the daemons that were running. rpm keeps
# a changed config as /etc/simplevpn/simplevpnd.toml.rpmsave, and the host's
# key; the simplevpn user and group stay.
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload || :
    if [ "$1" -ge 1 ]; then
        systemctl try-restart simplevpnd.service 'simplevpnd@*.service' || :
    fi
fi
if [ "$1" -eq 0 ]; then
    rmdir /etc/simplevpn /run/simplevpn 2>/dev/null || :
fi
