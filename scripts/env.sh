# Shared by the scripts: versions, caches and where throwaway clusters live.
# Builds are cached outside the checkout, so a fresh clone on the same machine reuses them.
export PGWATCH_CACHE="${PGWATCH_CACHE:-/var/cache/pgwatch}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PGWATCH_CACHE/target}"
PG_VERSIONS="${PG_VERSIONS:-13 15 17}"
PG_CONFIG_15=/usr/lib/postgresql/15/bin/pg_config
