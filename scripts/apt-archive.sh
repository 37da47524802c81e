# apt-archive.sh -- sourced, not run.  archive_uri prints the Debian archive
# URI this system's apt sources already use (deb822 or one-line format,
# security archive skipped), so no script names an archive host itself.
# Prints nothing and returns 1 when none is found.
archive_uri() {
    local f uri=""
    for f in /etc/apt/sources.list.d/*.sources; do
        [ -f "$f" ] || continue
        uri=$(awk '/^URIs:/ { for (i = 2; i <= NF; i++) if ($i !~ /security/) { print $i; exit } }' "$f")
        [ -n "$uri" ] && break
    done
    if [ -z "$uri" ] && [ -f /etc/apt/sources.list ]; then
        uri=$(awk '$1 == "deb" { for (i = 2; i <= NF; i++) if ($i ~ /:\/\//) { if ($i !~ /security/) { print $i; exit } } }' /etc/apt/sources.list)
    fi
    [ -n "$uri" ] || return 1
    printf '%s\n' "$uri"
}
