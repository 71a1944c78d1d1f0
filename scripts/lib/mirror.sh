#!/usr/bin/env bash
# The machine's own Debian mirror, read from its apt configuration: ONE reader for every script
# (scripts/image.sh builds the base image from it, scripts/fetch-consul.sh downloads Consul's .deb).
# No mirror host is written anywhere in this repository.
#
# Reads both source formats apt reads, in apt's order:
#   $SUPERVISE_APT_DIR/sources.list              one-line:  deb [signed-by=K arch=...] URI SUITE COMPONENT...
#   $SUPERVISE_APT_DIR/sources.list.d/*.list     one-line
#   $SUPERVISE_APT_DIR/sources.list.d/*.sources  deb822:    Types/URIs/Suites/Components/Signed-By/Enabled
# A Debian archive is recognised by its suite (a Debian code name or alias, with an optional
# -updates/-security/-backports suffix), not by its host: third-party repositories use their own
# suite names (nodistro, cloud-sdk-bookworm, ...).  The host may run any Debian release (bookworm,
# trixie, ...): `sources SUITE` points the same archives at the suite we need.
#
# Use as a library (`. scripts/lib/mirror.sh`, then the mirror_* functions) or as a command:
#   scripts/lib/mirror.sh [--apt-dir DIR] entries        URI SUITE KEYRING   every enabled deb entry
#   scripts/lib/mirror.sh [--apt-dir DIR] debian         URI KEYRING KIND    Debian archives, KIND main|security,
#                                                                            main ones first, each URI once
#   scripts/lib/mirror.sh [--apt-dir DIR] sources SUITE  a one-line sources.list for SUITE, SUITE-updates and
#                                                        SUITE-security from the host's archives (for mmdebstrap)
#   scripts/lib/mirror.sh aptopts                        the host's apt options a mirror may need (validity
#                                                        checks, proxies, retries, timeouts), one per line
#
# Environment:
#   SUPERVISE_APT_DIR                 apt's configuration directory (default /etc/apt; tests point it elsewhere)
#   SUPERVISE_DEBIAN_MIRROR           use this archive URI instead of the host's main archive(s)
#   SUPERVISE_DEBIAN_SECURITY_MIRROR  with SUPERVISE_DEBIAN_MIRROR: the security archive (else none is used)

MIRROR_SUITE_RE='^(buster|bullseye|bookworm|trixie|forky|duke|sid|oldoldstable|oldstable|stable|testing|unstable)((-updates|-security|-backports|-backports-sloppy|-proposed-updates)|/updates)?$'

mirror_default_keyring() {
    local k
    for k in /usr/share/keyrings/debian-archive-keyring.gpg /usr/share/keyrings/debian-archive-keyring.pgp; do
        [ -e "$k" ] && { printf '%s\n' "$k"; return; }
    done
    printf '%s\n' /usr/share/keyrings/debian-archive-keyring.gpg
}

# The source files apt reads, in apt's order (sources.list first, then the parts by name).
mirror_files() {
    local dir="${SUPERVISE_APT_DIR:-/etc/apt}" f
    [ -f "$dir/sources.list" ] && printf '%s\n' "$dir/sources.list"
    for f in "$dir"/sources.list.d/*; do
        case "$f" in *.list|*.sources) [ -f "$f" ] && printf '%s\n' "$f";; esac
    done | LC_ALL=C sort
    return 0
}

# URI SUITE KEYRING for every enabled binary ("deb") entry; KEYRING is "-" when the entry names
# none (or embeds the key itself).
mirror_entries() {
    local f
    while IFS= read -r f; do
        case "$f" in
        *.sources) awk '
            function flush(   nu, ns, i, j, u, s, kr) {
                if (types ~ /(^|[ \t])deb([ \t]|$)/ && tolower(enabled) !~ /^[ \t]*(no|false|0)[ \t]*$/) {
                    kr = (keyring == "" || keyring ~ /BEGIN PGP/) ? "-" : keyring
                    nu = split(uris, u, /[ \t]+/); ns = split(suites, s, /[ \t]+/)
                    for (i = 1; i <= nu; i++) if (u[i] != "" && u[i] !~ /^cdrom:/)
                        for (j = 1; j <= ns; j++) if (s[j] != "") print u[i], s[j], kr
                }
                types = ""; uris = ""; suites = ""; keyring = ""; enabled = ""; key = ""
            }
            /^[ \t]*#/ { next }
            /^[ \t]*$/ { flush(); next }
            /^[ \t]/ {                               # continuation of the previous field
                v = $0; gsub(/^[ \t]+|[ \t]+$/, "", v)
                if (v == ".") v = ""
                if (key == "types") types = types " " v
                else if (key == "uris") uris = uris " " v
                else if (key == "suites") suites = suites " " v
                else if (key == "signed-by") keyring = keyring " " v
                else if (key == "enabled") enabled = enabled " " v
                next
            }
            {
                key = tolower($0); sub(/:.*/, "", key); gsub(/[ \t]/, "", key)
                v = $0; sub(/^[^:]*:[ \t]*/, "", v); sub(/[ \t]+$/, "", v)
                if (key == "types") types = v
                else if (key == "uris") uris = v
                else if (key == "suites") suites = v
                else if (key == "signed-by") keyring = v
                else if (key == "enabled") enabled = v
            }
            END { flush() }
            ' "$f" ;;
        *) awk '
            {
                line = $0
                sub(/#.*/, "", line)
                if (line !~ /^[ \t]*deb[ \t]/) next          # deb-src, comments, blank lines
                sub(/^[ \t]*deb[ \t]+/, "", line)
                kr = "-"
                if (line ~ /^\[/) {
                    opts = line; sub(/\].*/, "", opts); sub(/^\[/, "", opts)
                    sub(/^\[[^]]*\][ \t]*/, "", line)
                    n = split(opts, o, /[ \t]+/)
                    for (i = 1; i <= n; i++) if (tolower(o[i]) ~ /^signed-by=/) { kr = o[i]; sub(/^[^=]*=/, "", kr) }
                }
                n = split(line, w, /[ \t]+/)
                if (w[1] == "") { for (i = 1; i < n; i++) w[i] = w[i + 1]; n-- }
                if (n >= 2 && w[1] !~ /^cdrom:/) print w[1], w[2], kr
            }
            ' "$f" ;;
        esac
    done < <(mirror_files)
}

# URI KEYRING KIND (main|security) for the Debian archives, main ones first, each URI once.
mirror_debian() {
    local default_kr
    default_kr="$(mirror_default_keyring)"
    if [ -n "${SUPERVISE_DEBIAN_MIRROR:-}" ]; then
        printf '%s %s main\n' "$SUPERVISE_DEBIAN_MIRROR" "$default_kr"
        [ -n "${SUPERVISE_DEBIAN_SECURITY_MIRROR:-}" ] && printf '%s %s security\n' "$SUPERVISE_DEBIAN_SECURITY_MIRROR" "$default_kr"
        return 0
    fi
    mirror_entries | awk -v re="$MIRROR_SUITE_RE" -v dkr="$default_kr" '
        $2 ~ re && !seen[$1]++ {
            kind = ($2 ~ /(-security|\/updates)$/ || $1 ~ /debian-security\/?$/) ? "security" : "main"
            line = $1 " " ($3 == "-" ? dkr : $3) " " kind
            if (kind == "main") print line; else sec[++n] = line
        }
        END { for (i = 1; i <= n; i++) print sec[i] }'
}

# A one-line sources.list for SUITE (main component): SUITE and SUITE-updates from the first main
# archive, SUITE-security from the first security archive.  Fails when the host has no Debian archive.
mirror_sources() {
    local suite="${1:?mirror_sources SUITE}" list
    list="$(mirror_debian)"
    printf '%s\n' "$list" | awk -v suite="$suite" '
        $3 == "main" && !m++ { printf "deb [signed-by=%s] %s %s main\ndeb [signed-by=%s] %s %s-updates main\n", $2, $1, suite, $2, $1, suite }
        $3 == "security" && !s++ { printf "deb [signed-by=%s] %s %s-security main\n", $2, $1, suite }
        END { if (!m) exit 1 }'
}

# The host's apt options a mirror may need, as `apt-config dump` prints them (Name "value";).
mirror_aptopts() {
    apt-config dump 2>/dev/null | grep -E '^Acquire::(Check-Valid-Until|Check-Date|Max-ValidTime|Retries|ForceIPv4|ForceIPv6|(http|https|ftp|socks5)::([Pp]roxy|Proxy-Auto-Detect|Timeout))( |::)' || true
}

mirror_where() {  # for error messages
    local dir="${SUPERVISE_APT_DIR:-/etc/apt}"
    printf '%s\n' "$dir/sources.list, $dir/sources.list.d/*.list, $dir/sources.list.d/*.sources"
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
    set -euo pipefail
    if [ "${1:-}" = "--apt-dir" ]; then SUPERVISE_APT_DIR="${2:?--apt-dir DIR}"; shift 2; fi
    case "${1:-}" in
        entries) mirror_entries ;;
        debian) out="$(mirror_debian)"; [ -n "$out" ] || { echo "mirror: no Debian archive in $(mirror_where)" >&2; exit 1; }; printf '%s\n' "$out" ;;
        sources) mirror_sources "${2:?sources SUITE}" || { echo "mirror: no Debian archive in $(mirror_where); set SUPERVISE_DEBIAN_MIRROR" >&2; exit 1; } ;;
        aptopts) mirror_aptopts ;;
        *) sed -n '2,/^$/p' "$0" | sed 's/^# \{0,1\}//'; exit 2 ;;
    esac
fi
