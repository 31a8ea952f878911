# simplevpn %preun ($1: 0 on erase, 1 on upgrade): on erase, stop every
# simplevpnd unit and disable the ones an admin enabled.
if [ "$1" -eq 0 ]; then
    if [ -d /run/systemd/system ]; then
        systemctl stop simplevpnd.service 'simplevpnd@*.service' || :
    fi
    units=$(find /etc/systemd/system -type l \( -name simplevpnd.service -o -name 'simplevpnd@?*.service' \) \
        -printf '%f\n' 2>/dev/null | sort -u)
    if [ -n "$units" ] && command -v systemctl >/dev/null 2>&1; then
        # shellcheck disable=SC2086 # one word per unit
        systemctl disable $units || :
    fi
fi
