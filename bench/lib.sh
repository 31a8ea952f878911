# bench/lib.sh: what bench/run and bench/profile share (sourced, not run):
# progress lines, dependencies, the release build, simplevpnd's version-
# dependent flags, processes started by PID and stopped on exit, namespaces
# deleted on exit, veth links, iperf3 servers.
#
# The sourcing script makes workdir (a temp dir) and calls arm_cleanup, and
# later sets finished=1 when all went well (then cleanup deletes
# workdir); it adds what it starts with `start` and every namespace it makes
# to made_ns. Everything stays inside the namespaces it makes, with addresses
# from 198.18.0.0/15 only.

t0=$SECONDS
say() { printf '[%4ds] %s\n' $((SECONDS - t0)) "$*"; }
die() { printf '\nbench: FAILED: %s\n' "$*" >&2; exit 1; }

require_root() {
  if ((EUID != 0)); then
    echo "bench: run as root (it creates network namespaces): sudo $0" >&2
    exit 1
  fi
}

# install_missing CMD=PACKAGE...: installs (apt-get) the Debian packages of
# the commands that are missing.
install_missing() {
  local pair missing=()
  for pair in "$@"; do
    command -v "${pair%%=*}" >/dev/null 2>&1 || missing+=("${pair#*=}")
  done
  if ((${#missing[@]})); then
    say "installing ${missing[*]} (apt-get)"
    command -v apt-get >/dev/null 2>&1 || die "no apt-get: install ${missing[*]} yourself"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
  [[ -c /dev/net/tun ]] || die "/dev/net/tun is missing (modprobe tun)"
}

# build_release: cargo build --release --workspace in the current directory (the
# repository); under sudo as the invoking user so target/ keeps its owner.
build_release() {
  local cargo=(cargo) home
  command -v cargo >/dev/null 2>&1 || die "cargo not found: install Rust (https://rustup.rs), or run scripts/deps"
  if [[ -n ${SUDO_USER:-} && $SUDO_USER != root && $(stat -c %U .) == "$SUDO_USER" ]]; then
    home=$(getent passwd "$SUDO_USER" | cut -d: -f6)
    cargo=(sudo -u "$SUDO_USER" env "HOME=$home" "PATH=$home/.cargo/bin:$PATH" cargo)
  fi
  say "building: cargo build --release --workspace"
  "${cargo[@]}" build --release --workspace --quiet
}

DAEMON_USER=${DAEMON_USER:-nobody} # for --user, once simplevpnd has it (privilege separation)
SVPN_SERVER_FLAGS=()
SVPN_CLIENT_FLAGS=()

# detect_daemon_flags: simplevpnd's ($bin) flags that come and go with its
# versions, added to SVPN_SERVER_FLAGS / SVPN_CLIENT_FLAGS (so the scripts
# work before and after --user / --legacy exist). Add more here.
detect_daemon_flags() {
  local server_help client_help
  server_help=$("$bin" server --help)
  client_help=$("$bin" client --help)
  if grep -q -- '--user' <<<"$server_help"; then SVPN_SERVER_FLAGS+=(--user "$DAEMON_USER"); fi
  if grep -q -- '--user' <<<"$client_help"; then SVPN_CLIENT_FLAGS+=(--user "$DAEMON_USER"); fi
  # Plaintext rows: a client without a key speaks the original protocol only when told.
  if grep -q -- '--legacy' <<<"$client_help"; then SVPN_CLIENT_FLAGS+=(--legacy); fi
  # With TLS, the server serves the original protocol only when told to.
  if grep -q -- '--legacy' <<<"$server_help"; then SVPN_SERVER_FLAGS+=(--legacy); fi
  # The scale rows hold thousands of original-protocol peers from one load
  # generator's address; the default cap per source (16) is for real servers.
  if grep -q -- '--legacy-max-per-source' <<<"$server_help"; then SVPN_SERVER_FLAGS+=(--legacy-max-per-source 65536); fi
}

# server_has_flag FLAG: whether `simplevpnd server --help` lists FLAG.
server_has_flag() { grep -q -- "$1" <<<"$("$bin" server --help)"; }

# --------------------------------------------------- processes and cleanup --
made_ns=()
declare -A running=() # PID -> what, for everything started and not yet reaped
finished=0

# cleanup: on exit (also on failure or Ctrl-C) stops what was started, by
# PID, deletes the namespaces made; keeps workdir (the logs) unless all went well.
cleanup() {
  local rc=$? pid ns deadline
  trap - EXIT INT TERM
  ((${#running[@]} + ${#made_ns[@]})) && say "cleaning up"
  for pid in "${!running[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${!running[@]}"; do
    deadline=$((SECONDS + ${CLEANUP_WAIT:-5}))
    while kill -0 "$pid" 2>/dev/null && ((SECONDS < deadline)); do sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  done
  for ns in "${made_ns[@]}"; do
    ip netns del "$ns" || { printf 'bench: could not delete namespace %s\n' "$ns" >&2; rc=1; }
  done
  if ((rc == 0 && finished)); then
    rm -rf "$workdir"
    say "stopped everything it started; namespaces ${made_ns[*]} deleted"
  else
    printf '\nbench: %s; logs kept in %s\n' "$( ((rc == 130 || rc == 143)) && echo interrupted || echo FAILED)" "$workdir" >&2
  fi
  exit "$rc"
}
# arm_cleanup: cleanup on exit, Ctrl-C and SIGTERM (once workdir exists).
arm_cleanup() {
  trap cleanup EXIT
  trap 'exit 130' INT
  trap 'exit 143' TERM
}

# make_namespaces NS...: new namespaces (deleted on exit), loopback up.
make_namespaces() {
  local ns
  for ns in "$@"; do
    ip netns add "$ns"
    made_ns+=("$ns")
    ip -n "$ns" link set lo up
  done
}

# start NAME NS OUT ERR PROGRAM ARGS...: runs PROGRAM in NS in the
# background, stdout to OUT, stderr to ERR (or to OUT if ERR is ""); its PID
# (the program's own: ip netns exec execs) is left in $last_pid.
start() {
  local name=$1 ns=$2 out=$3 err=${4:-$3}
  shift 4
  if [[ $err == "$out" ]]; then
    ip netns exec "$ns" "$@" >"$out" 2>&1 </dev/null &
  else
    ip netns exec "$ns" "$@" >"$out" 2>"$err" </dev/null &
  fi
  last_pid=$!
  running[$last_pid]=$name
}

# reap PID SECS: waits up to SECS for PID to exit and returns its status (124 if it did not).
reap() {
  local pid=$1 deadline=$((SECONDS + $2)) rc=0
  while kill -0 "$pid" 2>/dev/null && ((SECONDS < deadline)); do sleep 0.1; done
  if kill -0 "$pid" 2>/dev/null; then return 124; fi
  wait "$pid" || rc=$?
  unset "running[$pid]"
  return "$rc"
}

# stop PID [SECS]: SIGTERM, up to SECS (default 10) s, then SIGKILL.
stop() {
  local pid=$1
  kill -TERM "$pid" 2>/dev/null || true
  reap "$pid" "${2:-10}" && return 0
  kill -KILL "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  unset "running[$pid]"
}

# wait_for NAME PID FILE TEXT SECS: until FILE contains TEXT; fails if PID died or SECS passed.
wait_for() {
  local name=$1 pid=$2 file=$3 text=$4 deadline=$((SECONDS + $5))
  until grep -qsF -- "$text" "$file"; do
    kill -0 "$pid" 2>/dev/null || die "$name exited before '$text'; last lines of $file:
$(tail -n 15 "$file")"
    ((SECONDS < deadline)) || die "$name: no '$text' within $5 s; last lines of $file:
$(tail -n 15 "$file")"
    sleep 0.1
  done
}

# link NS_A IF_A ADDR_A NS_B IF_B ADDR_B: a veth pair made directly inside the two namespaces.
link() {
  ip link add "$2" netns "$1" type veth peer name "$5" netns "$4"
  ip -n "$1" addr add "$3" dev "$2"
  ip -n "$4" addr add "$6" dev "$5"
  ip -n "$1" link set "$2" up
  ip -n "$4" link set "$5" up
}

declare -A iperf_server=() # NS:PORT -> PID of its iperf3 server

# iperf_server_start NS [PORT]: (re)starts the iperf3 server of NS on PORT
# (default 5201, all addresses).
iperf_server_start() {
  local ns=$1 port=${2:-5201} deadline=$((SECONDS + 5))
  [[ -n ${iperf_server[$ns:$port]:-} ]] && stop "${iperf_server[$ns:$port]}"
  start "iperf3 server in $ns:$port" "$ns" "$workdir/iperf3-server-$ns-$port.log" "" iperf3 -s -p "$port"
  iperf_server[$ns:$port]=$last_pid
  until ip netns exec "$ns" ss -Hltn "sport = :$port" | grep -q .; do
    ((SECONDS < deadline)) || die "the iperf3 server in $ns did not listen within 5 s"
    sleep 0.1
  done
}
