# Shared by the scripts: the PostgreSQL versions pgwatch supports, caches, and small helpers.
# Builds are cached outside the checkout, so a fresh clone on the same machine reuses them.

# Every PostgreSQL major version pgwatch supports; scripts/test runs the suite on each of them.
# This is the one list: Cargo.toml has a feature per entry and scripts/setup a source per entry.
PG_SUPPORTED="13 14 15 16 17 18"
PG_VERSIONS="${PG_VERSIONS:-$PG_SUPPORTED}"

export PGWATCH_CACHE="${PGWATCH_CACHE:-/var/cache/pgwatch}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PGWATCH_CACHE/target}"

# Where PostgreSQL $1's pg_config lives: Debian's package for 15, /opt/pg/NN for the others.
pg_config_of() {
    if [[ $1 == 15 ]]; then echo /usr/lib/postgresql/15/bin/pg_config; else echo "/opt/pg/$1/bin/pg_config"; fi
}

log() { printf '\033[1m==> %s\033[0m\n' "$*"; }

# Runs "$@" and prints a line every 30 seconds while it does, so a long quiet step is seen working.
# $1 names the step in those lines.
with_heartbeat() {
    local what=$1 start=$SECONDS beat status=0
    shift
    (
        while sleep 30; do printf '    ... still %s (%d s)\n' "$what" $((SECONDS - start)); done
    ) &
    beat=$!
    "$@" || status=$?
    kill "$beat" 2>/dev/null
    wait "$beat" 2>/dev/null || true
    return "$status"
}
