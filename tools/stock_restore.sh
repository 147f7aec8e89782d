#!/bin/bash
# Restore a pack made with hidden names using stock tools only: ipfs-car, age or gpg, zstd,
# python3-cbor2 (Debian) and jq. No packerfs. The README's "Restoring without packerfs" shows
# this script; tests/test_private_pack.py runs it.
#   usage: stock_restore.sh KEY.txt CARS_DIR OUT_DIR   (an age identity file)
#          stock_restore.sh gpg CARS_DIR OUT_DIR       (OpenPGP: gpg's keyring, GNUPGHOME if set)
# Limits: paths holding a tab or a newline are not handled; for a set repacked over several
# snapshots, a file deleted since an older one comes back (packerfs unpack follows the snapshot).
set -euo pipefail
key=$1 cars=$2 out=$3
decrypt() { if [ "$key" = gpg ]; then gpg --batch -q -d; else age -d -i "$key"; fi; }   # stdin to stdout
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
for car in "$cars"/*.car; do                       # 1. each CAR into its own directory
  ipfs-car unpack "$car" --output "$work/$(basename "$car" .car)" >/dev/null
done
for bin in "$work"/*/; do                          # 2. its sealed manifest, as JSON lines
  cat "$bin".packerfs/manifest.cbor.* | decrypt | python3 -m cbor2.tool |
    jq -r --arg bin "$bin" '.entries[] |
      # (no field is empty: read would merge two tabs)
      [.kind, (.version // 0), (.part // 0), .mode, .mtime_ns, "./" + .path, $bin + (.name // ""), (.target // "-")] | @tsv'
done | sort -t$'\t' -k2,2n -k3,3n > "$work/entries.tsv"
mkdir -p "$out"
while IFS=$'\t' read -r kind version part mode mtime path stored target; do
  case $kind in                                    # 3. directories and symlinks
    dir) mkdir -p "$out/$path" ;;
    symlink) mkdir -p "$(dirname "$out/$path")"; ln -sfn "$target" "$out/$path" ;;
  esac
done < "$work/entries.tsv"
# 4. each path's newest version: its parts in order, decrypted, decompressed if it is .zst
awk -F'\t' '$1 == "file" {newest[$6] = $2} END {for (p in newest) print newest[p] "\t" p}' "$work/entries.tsv" |
while IFS=$'\t' read -r version path; do
  awk -F'\t' -v v="$version" '$1 == "file" && $2 == v {print $7}' "$work/entries.tsv" > "$work/parts"
  mkdir -p "$(dirname "$out/$path")"
  if grep -Eq '\.zst\.(age|gpg)$' "$work/parts"; then
    xargs -d '\n' cat < "$work/parts" | decrypt | zstd -d -q > "$out/$path"
  else
    xargs -d '\n' cat < "$work/parts" | decrypt > "$out/$path"
  fi
done
# 5. modes and mtimes, deepest paths first so that a directory's mtime is set after its contents
sort -t$'\t' -k6,6r -k2,2n "$work/entries.tsv" | while IFS=$'\t' read -r kind version part mode mtime path stored target; do
  [ "$kind" = symlink ] && continue
  chmod "$(printf '%o' "$mode")" "$out/$path"
  touch -h -d "@${mtime:0:-9}.${mtime: -9}" "$out/$path"
done
