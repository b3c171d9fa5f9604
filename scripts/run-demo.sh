#!/usr/bin/env bash
# Shortcut for `scripts/run.sh --demo`.
exec bash "$(dirname "${BASH_SOURCE[0]}")/run.sh" --demo "$@"
