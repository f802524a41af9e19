#!/usr/bin/env bash
# Builds a self-contained database image from this machine's Debian files, with no registry:
#
#   bash packaging/images/build-image.sh postgres [TAG]   default TAG dbvm/postgres:15
#   bash packaging/images/build-image.sh mariadb  [TAG]   default TAG dbvm/mariadb:10.11
#
# The engine is the one DOCKER_HOST points at (unix://… only), else /var/run/docker.sock.
# The root filesystem is the server's files, the `ldd` closure of every executable and
# library in it, a static busybox (/bin/sh and the usual tools) and passwd/group entries
# for the database user (uid/gid 999). It is packed into a sorted tarball with owners
# normalised and mtimes clamped, so the same Debian files always give the same layer; the
# tarball's sha256 is the image label `dbvm.content`, and when TAG already carries that
# label nothing is imported (safe to run any number of times). The label `dbvm.recipe` is
# the sha256 of this script: tests/src/docker.rs rebuilds an image whose recipe is not the
# current one (say, one built before a tool was added) without building the tarball first.
#
# Needs: docker CLI (docker.io), busybox-static, zstd, and postgresql-15 + pgbackrest or
# mariadb-server + mariadb-backup (all installed by scripts/setup.sh). See packaging/images/README.md for how to run them.
set -euo pipefail

say() { printf '==> %s\n' "$*" >&2; }
die() {
  echo "build-image.sh: $*" >&2
  exit 1
}

[ $# -ge 1 ] && [ $# -le 2 ] || die "usage: bash packaging/images/build-image.sh postgres|mariadb [TAG]"
engine=$1
case "$engine" in
postgres) tag=${2:-dbvm/postgres:15} ;;
mariadb) tag=${2:-dbvm/mariadb:10.11} ;;
*) die "unknown engine '$engine': expected postgres or mariadb" ;;
esac

command -v docker >/dev/null || die "docker CLI not found: install it: bash scripts/setup.sh"
busybox=/bin/busybox
file -L "$busybox" 2>/dev/null | grep -q 'statically linked' ||
  die "$busybox is missing or not static: install busybox-static: bash scripts/setup.sh"
if [ -n "${DOCKER_HOST:-}" ] && [ "${DOCKER_HOST#unix://}" = "$DOCKER_HOST" ]; then
  die "DOCKER_HOST=$DOCKER_HOST: only unix:// sockets are supported"
fi
docker version --format '{{.Server.Version}}' >/dev/null 2>&1 ||
  die "no Docker engine answers at ${DOCKER_HOST:-unix:///var/run/docker.sock}: start one (bash scripts/dockerd.sh start DIR, then DOCKER_HOST=unix://DIR/docker.sock)"

recipe=$(sha256sum "${BASH_SOURCE[0]}" | cut -c1-64)
DB_UID=999
DB_GID=999
started=$(date +%s%N)
work=$(mktemp -d "${TMPDIR:-/tmp}/dbvm-image.XXXXXX")
trap 'rm -rf "$work"' EXIT
root="$work/rootfs"
mkdir -p "$root"/usr/bin "$root"/usr/sbin "$root"/usr/lib "$root"/usr/lib64 "$root"/etc \
  "$root"/tmp "$root"/dev "$root"/proc "$root"/sys "$root"/var/lib "$root"/run
chmod 1777 "$root/tmp"
# Debian 12's merged /usr: the ELF interpreter is /lib64/ld-linux-x86-64.so.2.
ln -s usr/bin "$root/bin"
ln -s usr/sbin "$root/sbin"
ln -s usr/lib "$root/lib"
ln -s usr/lib64 "$root/lib64"

# copy_tree SRC [tar --exclude options…]: copies SRC (a directory or file) to the same path
# in the root filesystem, keeping symlinks inside it as symlinks.
copy_tree() {
  local src=$1
  shift
  [ -e "$src" ] || die "$src is missing: install the Debian package that holds it (bash scripts/setup.sh)"
  tar -C / "$@" -cf - "${src#/}" | tar -C "$root" -xf -
}

# canonical PATH: /lib/x → /usr/lib/x (merged /usr), so each library has one home.
canonical() {
  case "$1" in
  /lib/* | /lib64/* | /bin/* | /sbin/*) echo "/usr$1" ;;
  *) echo "$1" ;;
  esac
}

# add_ldd_closure: every ELF file in the root filesystem gets the shared libraries `ldd`
# resolves for it on the host, copied (dereferenced) to the same canonical path.
add_ldd_closure() {
  local libs="$work/libs"
  : >"$libs"
  while IFS= read -r -d '' f; do
    head -c 4 "$f" 2>/dev/null | grep -q 'ELF' || continue
    # ldd of the host copy: same bytes, and the host has every dependency installed.
    local host=${f#"$root"}
    ldd "$host" 2>/dev/null | awk '/=> \// {print $3} /^\t\/.*ld-linux/ {print $1}' >>"$libs" || true
  done < <(find "$root" -type f -perm -u+x -print0; find "$root" -type f -name '*.so*' -print0)
  sort -u "$libs" | while IFS= read -r lib; do
    [ -n "$lib" ] || continue
    # The file under its real name (libfoo.so.1.2.3) and the name ldd gave (libfoo.so.1)
    # as a symlink to it when both are in one directory, as on the host.
    local dst real
    dst=$(canonical "$lib")
    real=$(canonical "$(readlink -f "$lib")")
    [ -e "$root$dst" ] && continue
    mkdir -p "$root$(dirname "$dst")" "$root$(dirname "$real")"
    [ -e "$root$real" ] || cp -L "$lib" "$root$real"
    if [ "$real" = "$dst" ]; then
      :
    elif [ "$(dirname "$real")" = "$(dirname "$dst")" ]; then
      ln -s "$(basename "$real")" "$root$dst"
    else
      cp -L "$lib" "$root$dst"
    fi
  done
}

write_users() { # write_users NAME HOME
  cat >"$root/etc/passwd" <<EOF
root:x:0:0:root:/root:/bin/sh
$1:x:$DB_UID:$DB_GID:$1:$2:/bin/sh
nobody:x:65534:65534:nobody:/nonexistent:/bin/false
EOF
  cat >"$root/etc/group" <<EOF
root:x:0:
$1:x:$DB_GID:
nogroup:x:65534:
EOF
  echo 'passwd: files
group: files
hosts: files dns' >"$root/etc/nsswitch.conf"
  echo '127.0.0.1 localhost' >"$root/etc/hosts"
  mkdir -p "$root/root" "$root$2"
  chmod 700 "$root/root"
}

say "building the $engine image $tag"
# C.UTF-8 locale (initdb --locale=C.UTF-8) and the time zone database (both engines).
copy_tree /usr/lib/locale/C.utf8
copy_tree /usr/share/zoneinfo
# zstd (both engines): compresses backup streams in a pipe (mariadb-backup --stream | zstd);
# 1.2 MB, its library is already in the closure of both servers.
[ -x /usr/bin/zstd ] || die "/usr/bin/zstd is missing: install zstd (bash scripts/setup.sh)"
copy_tree /usr/bin/zstd
for name in unzstd zstdcat zstdmt; do
  ln -s zstd "$root/usr/bin/$name"
done

case "$engine" in
postgres)
  pg=/usr/lib/postgresql/15
  [ -x $pg/bin/postgres ] || die "$pg/bin/postgres is missing: install postgresql-15 (bash scripts/setup.sh)"
  [ -x $pg/bin/psql ] || die "$pg/bin/psql is missing: install postgresql-client-15 (bash scripts/setup.sh)"
  # Without JIT: llvmjit and its bitcode pull in libLLVM (105 MB); run postgres with -c jit=off.
  copy_tree $pg --exclude="${pg#/}/lib/bitcode" --exclude='llvmjit*'
  copy_tree /usr/share/postgresql/15
  # pgBackRest: the agent's PostgreSQL backups, and archive_command runs it inside the
  # container. Its libraries come with the ldd closure (libxml2, lz4, libssl; ICU and libpq
  # are the server's anyway). No /etc/pgbackrest.conf and no CA bundle: pass --config= and
  # repo1-storage-ca-file=. Its default log, spool and repository directories exist and
  # belong to the database user, as in Debian's package.
  [ -x /usr/bin/pgbackrest ] || die "/usr/bin/pgbackrest is missing: install pgbackrest (bash scripts/setup.sh)"
  copy_tree /usr/bin/pgbackrest
  write_users postgres /var/lib/postgresql
  mkdir -p "$root/var/run/postgresql" "$root/var/log/pgbackrest" "$root/var/spool/pgbackrest" \
    "$root/var/lib/pgbackrest"
  chown "$DB_UID:$DB_GID" "$root/var/run/postgresql" "$root/var/lib/postgresql" \
    "$root/var/log/pgbackrest" "$root/var/spool/pgbackrest" "$root/var/lib/pgbackrest"
  chmod 2775 "$root/var/run/postgresql"
  chmod 750 "$root/var/log/pgbackrest" "$root/var/spool/pgbackrest" "$root/var/lib/pgbackrest"
  # initdb runs `locale -a` to list collations; the image has C, C.utf8 and POSIX.
  printf '#!/bin/sh\n[ "$1" = -a ] && printf "C\\nC.utf8\\nPOSIX\\n"\nexit 0\n' >"$root/usr/bin/locale"
  chmod 755 "$root/usr/bin/locale"
  version=$($pg/bin/postgres --version | awk '{print $3}')
  path="$pg/bin:/usr/sbin:/usr/bin"
  user=postgres
  # SIGINT is PostgreSQL's fast shutdown (SIGTERM waits for every client to leave);
  # `docker import` cannot set STOPSIGNAL, so the label tells the runtime.
  stopsignal=SIGINT
  ;;
mariadb)
  [ -x /usr/sbin/mariadbd ] || die "/usr/sbin/mariadbd is missing: install mariadb-server (bash scripts/setup.sh)"
  [ -x /usr/bin/mariadb ] || die "/usr/bin/mariadb is missing: install mariadb-client (bash scripts/setup.sh)"
  [ -x /usr/bin/mariadb-backup ] || die "/usr/bin/mariadb-backup is missing: install mariadb-backup (bash scripts/setup.sh)"
  # Backups: mariadb-backup (physical backups, --stream=xbstream), mbstream (unpacks such a
  # stream on restore), mariadb-binlog (replays binary logs for point-in-time recovery).
  for f in /usr/sbin/mariadbd /usr/bin/mariadb /usr/bin/mariadb-admin /usr/bin/mariadb-dump \
    /usr/bin/mariadb-install-db /usr/bin/my_print_defaults /usr/bin/resolveip \
    /usr/bin/mariadb-tzinfo-to-sql /usr/bin/mariadb-upgrade /usr/bin/mariadb-backup \
    /usr/bin/mbstream /usr/bin/mariadb-binlog; do
    copy_tree "$f"
  done
  # The usual mysql* names, so scripts written for MySQL work too.
  ln -s mariadbd "$root/usr/sbin/mysqld"
  for pair in mysql:mariadb mysqladmin:mariadb-admin mysqldump:mariadb-dump \
    mysql_install_db:mariadb-install-db mysql_tzinfo_to_sql:mariadb-tzinfo-to-sql \
    mysql_upgrade:mariadb-upgrade mariabackup:mariadb-backup mysqlbinlog:mariadb-binlog; do
    ln -s "${pair#*:}" "$root/usr/bin/${pair%%:*}"
  done
  # Error messages, character sets, and the system-table SQL that --bootstrap runs.
  copy_tree /usr/share/mysql
  # Plugins, without PAM authentication (a setuid helper in a mysql-owned directory).
  copy_tree /usr/lib/mysql/plugin --exclude='auth_pam*'
  write_users mysql /var/lib/mysql
  mkdir -p "$root/run/mysqld"
  chown "$DB_UID:$DB_GID" "$root/run/mysqld" "$root/var/lib/mysql"
  chmod 2775 "$root/run/mysqld"
  version=$(/usr/sbin/mariadbd --version | grep -Eo 'Ver [0-9.]+' | awk '{print $2}')
  path="/usr/sbin:/usr/bin"
  user=mysql
  stopsignal=SIGTERM
  ;;
esac

# busybox as /bin/sh and the usual tools, where no real program has the name.
cp "$busybox" "$root/usr/bin/busybox"
for applet in $("$busybox" --list); do
  [ -e "$root/usr/bin/$applet" ] || [ -e "$root/usr/sbin/$applet" ] || ln -s busybox "$root/usr/bin/$applet"
done
add_ldd_closure
# glibc dlopens libgcc_s for thread cancellation; it is not in any ldd output.
for lib in /usr/lib/x86_64-linux-gnu/libgcc_s.so.1; do
  [ -e "$root$lib" ] || cp -L "$lib" "$root$lib"
done

# Reproducible tarball: sorted names, numeric owners (root, except the database user's
# directories chowned above), no atime/ctime, mtimes clamped to the newest Debian file of
# the server (a fixed instant for a given package version).
epoch=$(stat -c %Y "$( [ "$engine" = postgres ] && echo /usr/lib/postgresql/15/bin/postgres || echo /usr/sbin/mariadbd)")
tarball="$work/rootfs.tar"
tar -C "$root" --sort=name --numeric-owner --mtime="@$epoch" --clamp-mtime \
  --pax-option=exthdr.name=%d/PaxHeaders/%f,delete=atime,delete=ctime \
  --format=posix -cf "$tarball" .
content=$(sha256sum "$tarball" | cut -c1-64)
size=$(du -m "$tarball" | cut -f1)

existing=$(docker image inspect --format '{{index .Config.Labels "dbvm.content"}} {{index .Config.Labels "dbvm.recipe"}}' "$tag" 2>/dev/null || true)
if [ "$existing" = "$content $recipe" ]; then
  say "$tag is up to date (dbvm.content=${content:0:12}, ${size} MB); nothing to do"
  echo "$tag"
  exit 0
fi

docker import \
  -c "ENV PATH=$path" \
  -c "ENV LANG=C.UTF-8" \
  -c "USER $DB_UID:$DB_GID" \
  -c "WORKDIR /" \
  -c 'CMD ["/bin/sh"]' \
  -c "LABEL dbvm.engine=$engine dbvm.version=$version dbvm.user=$user dbvm.uid=$DB_UID dbvm.gid=$DB_GID dbvm.stop-signal=$stopsignal dbvm.content=$content dbvm.recipe=$recipe" \
  -m "dbvm $engine $version from Debian files (build-image.sh)" \
  "$tarball" "$tag" >/dev/null
took_ms=$((($(date +%s%N) - started) / 1000000))
took="$((took_ms / 1000)).$(printf '%03d' $((took_ms % 1000)))"
say "built $tag: $engine $version, ${size} MB, dbvm.content=${content:0:12}, ${took} s"
echo "$tag"
