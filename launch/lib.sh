# Shared by the launchers (sourced, not run): errors and --dry-run printing.

die() { echo "error: $*" >&2; exit 2; }

# Prints the command shell-quoted (so it can be pasted), then runs it unless dry_run=1.
do_cmd() {
  printf '%q ' "$@" | sed 's/ $//'
  echo
  if [ "${dry_run:-0}" = 0 ]; then "$@"; fi
}
