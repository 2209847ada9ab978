#!/usr/bin/env bash
# A pilot federation on one host, step by step as docs/deployment.md's runbooks say: the
# centre's certificates, SuperLink (loopback) and proxy (nginx: the Fleet API only); per
# hospital its own key (fedmets site keys), site service, SuperNode (its own FLWR_HOME and
# port) and approval of the run and its app bundle (fedmets site approve --app); registration
# before start; then one run.
#
#   bash scripts/pilot.sh COHORT WORK FEDERATION_TOML
#
# COHORT: one <site>/site.toml per hospital (extracted, [policy] folds = the run's [cv] folds).
# WORK: created; every process logs to WORK/logs/<process>.log, the run writes WORK/run/.
# The federation config is copied to WORK/federation.toml with [federation.identities] added.
# Prints the node-id to hospital table, then the run's result; stops every process it started.
set -euo pipefail

cohort=$(cd "$1" && pwd)
mkdir -p "$2"
work=$(cd "$2" && pwd)
federation_source=$3
repo=$(cd "$(dirname "$0")/.." && pwd)
[[ -x $repo/.venv/bin/fedmets ]] && export PATH="$repo/.venv/bin:$PATH"
export PATH="$PATH:/usr/sbin" FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
export FLWR_DISABLE_UPDATE_CHECK=1 PYTHONUNBUFFERED=1
mkdir -p "$work/logs" "$work/sockets"
started=()

stop_all() {
    for pid in "${started[@]}"; do kill -TERM -- "-$pid" 2>/dev/null || true; done
    for pid in "${started[@]}"; do wait "$pid" 2>/dev/null || true; done
}
trap stop_all EXIT

start() {  # start NAME COMMAND...: in its own session (its "terminal"), logging to logs/NAME.log
    local name=$1
    shift
    setsid "$@" >>"$work/logs/$name.log" 2>&1 &
    started+=("$!")
}

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

wait_for_port() {  # wait_for_port PORT WHAT
    for _ in $(seq 600); do
        (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
        sleep 0.2
    done
    echo "$2 did not open port $1 (see $work/logs/)" >&2
    return 1
}

sites=()
for toml in "$cohort"/*/site.toml; do
    sites+=("$(basename "$(dirname "$toml")")")
done

echo "== centre: certificates"
fedmets certs --out "$work/pki" --host localhost

echo "== hospitals: each makes its key, keeps the private one, sends the .pub"
for site in "${sites[@]}"; do
    if grep -q '^\[service\]' "$cohort/$site/site.toml"; then
        echo "$cohort/$site/site.toml has a [service] table already: use a fresh cohort" >&2
        exit 1
    fi
    fedmets site keys --site "$site" --out "$work/hospitals/$site/keys"
    # the hospital's site config: its key and its service's socket
    printf '\n[service]\nidentity_key = "%s"\nsocket = "%s"\n' \
        "$work/hospitals/$site/keys/$site" "$work/sockets/$site.sock" \
        >>"$cohort/$site/site.toml"
done

echo "== centre: the federation config lists each hospital's public key"
python3 - "$federation_source" "$work/federation.toml" "$work/hospitals" "${sites[@]}" <<'EOF'
import sys, tomllib
from pathlib import Path
import tomli_w
source, out, hospitals, *sites = sys.argv[1:]
config = tomllib.loads(Path(source).read_text())
config.setdefault("federation", {})["identities"] = {
    site: (Path(hospitals) / site / "keys" / f"{site}.pub").read_text().strip() for site in sites
}
Path(out).write_text(tomli_w.dumps(config))
EOF
fedmets config check "$work/federation.toml"
echo "== centre: the app bundle the run uploads, sent to the hospitals with the config"
fedmets app-folder "$work/app"
(cd "$work" && flwr build --app "$work/app" >/dev/null)
bundle=$(ls "$work"/*.fab)

echo "== centre: SuperLink on loopback, proxy for the hospitals"
link_port=$(free_port)
public_port=$(free_port)
export FLWR_HOME=$work/centre/flwr-home
mkdir -p "$FLWR_HOME"
start superlink flower-superlink --host 127.0.0.1 --port "$link_port" \
    --database "$FLWR_HOME/state.db" --isolation subprocess \
    --disable-runtime-dependency-installation \
    --ssl-ca-certfile "$work/pki/ca.crt" --ssl-certfile "$work/pki/server.pem" \
    --ssl-keyfile "$work/pki/server.key" --enable-supernode-auth
wait_for_port "$link_port" SuperLink
mkdir -p "$work/centre/proxy"
fedmets proxy-config --certs "$work/pki" --folder "$work/centre/proxy" \
    --listen "127.0.0.1:$public_port" --superlink-port "$link_port" >"$work/centre/nginx.conf"
start proxy nginx -c "$work/centre/nginx.conf" -e stderr
wait_for_port "$public_port" proxy
cat >"$FLWR_HOME/config.toml" <<EOF
[superlink]
default = "centre"

[superlink.centre]
address = "127.0.0.1:$link_port"
root-certificates = "$work/pki/ca.crt"
EOF

echo "== centre: register each hospital's key (before its SuperNode starts)"
printf '%-10s %s\n' node-id hospital >"$work/node-table.txt"
for site in "${sites[@]}"; do
    registered=$(flwr supernode register "$work/hospitals/$site/keys/$site.pub" centre \
        --format json)
    node=$(python3 -c 'import json, sys; print(json.load(sys.stdin)["node-id"])' <<<"$registered")
    printf '%-10s %s\n' "$node" "$site" >>"$work/node-table.txt"
done
cat "$work/node-table.txt"

echo "== hospitals: site service, SuperNode (own FLWR_HOME and port), approval of the run"
for site in "${sites[@]}"; do
    start "service-$site" fedmets site serve --config "$cohort/$site/site.toml"
    for _ in $(seq 900); do [[ -S $work/sockets/$site.sock ]] && break; sleep 0.2; done
    [[ -S $work/sockets/$site.sock ]] || { echo "the site service of $site did not start" >&2; exit 1; }
    mkdir -p "$work/hospitals/$site/flwr-home"
    FLWR_HOME=$work/hospitals/$site/flwr-home start "supernode-$site" flower-supernode \
        --superlink "127.0.0.1:$public_port" --root-certificates "$work/pki/ca.crt" \
        --auth-supernode-private-key "$work/hospitals/$site/keys/$site" \
        --isolation subprocess --port "$(free_port)" \
        --node-config "site-service=\"$work/sockets/$site.sock\""
    fedmets site approve --config "$cohort/$site/site.toml" --run-config "$work/federation.toml" \
        --app "$bundle"
done

echo "== centre: the run"
flwr run "$work/app" centre --stream \
    --run-config "federation-config=\"$work/federation.toml\" out=\"$work/run\"" \
    >>"$work/logs/flwr-run.log" 2>&1
if [[ ! -f $work/run/federated.json ]]; then
    echo "the run did not finish: $work/run/server.log, $work/run/error.txt" >&2
    exit 1
fi
echo "== done: $work/run/federated.json, report $work/run/report/report.html"
