# Shared by the scripts: where builds and throwaway clusters live.
# Builds are cached outside the checkout, so a fresh clone on the same machine reuses them.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/cache/pgwatch/target}"
PG_CONFIG_15=/usr/lib/postgresql/15/bin/pg_config
