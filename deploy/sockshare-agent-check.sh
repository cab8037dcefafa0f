#!/bin/bash
# sockshare-agent-check.sh HOST PORT: ask a sockshare health agent (--agent HOST:PORT)
# and answer keepalived's MISC_CHECK with misc_dynamic (deploy/keepalived.conf):
#   exit 0       up, weight unchanged
#   exit 1       down (maint, or no answer)
#   exit 2..255  up with weight = status - 2: "ready 80%" -> 82 (weight 80), "drain" -> 2
#                (weight 0: no new connections, open ones stay)
set -u
host=${1:?usage: $0 HOST PORT} port=${2:?usage: $0 HOST PORT}
line=$(timeout 2 bash -c 'exec 3<>"/dev/tcp/$0/$1" && head -n1 <&3' "$host" "$port" 2>/dev/null) || exit 1
case "$line" in
    ready\ *%) pct=${line#ready }; pct=${pct%\%}; exit $((2 + pct)) ;;
    ready*) exit 0 ;;
    drain*) exit 2 ;;
    *) exit 1 ;;
esac
