#!/bin/bash -eu
# bundle_qemu.sh DEST: copy the qemu-system-x86_64 on PATH into DEST with what it needs to run where QEMU is
# not installed (the ClusterFuzzLite / OSS-Fuzz runner images):
#   DEST/bin/qemu-system-x86_64       the binary
#   DEST/lib/                         the shared libraries ldd names for it and its modules, but glibc's
#                                     (the runner image is the build image's OS and has the same glibc)
#   DEST/<prefix-relative module dir> its loadable modules (the TCG accelerator is one on Debian and Ubuntu)
#   DEST/<prefix-relative data dirs>  the firmware and data folders `qemu-system-x86_64 -L help` lists
#                                     (share/qemu, share/seabios, ...), symlinks resolved
#   DEST/qemu-system-x86_64           the launcher vballoon runs: sets LD_LIBRARY_PATH and QEMU_MODULE_DIR,
#                                     unsets LD_PRELOAD (the sanitizer runtime the runner preloads),
#                                     passes one -L per data folder
# The layout under DEST mirrors QEMU's install prefix, so QEMU's own relocation finds the same folders.

dest=${1:?usage: bundle_qemu.sh DEST}
qemu=$(command -v qemu-system-x86_64) || { echo "bundle_qemu.sh: qemu-system-x86_64 is not on PATH" >&2; exit 1; }
qemu=$(readlink -f "$qemu")
prefix=$(dirname "$(dirname "$qemu")")
glibc='^(ld-linux.*|libc|libm|libdl|libpthread|librt|libutil|libresolv|libanl)\.so'

rm -rf "$dest"
mkdir -p "$dest/bin" "$dest/lib"
cp "$qemu" "$dest/bin/qemu-system-x86_64"

copy_libraries() {  # the non-glibc libraries ldd resolves for the ELF file $1
  ldd "$1" | awk '$2 == "=>" && $3 ~ /^\// {print $3}' | while read -r library; do
    if ! basename "$library" | grep -Eq "$glibc"; then
      cp -L "$library" "$dest/lib/"
    fi
  done
}
copy_tree() {  # the regular files under $1 (symlinks followed, dangling ones skipped) to $2
  (cd "$1" && find -L . -type f) | while read -r file; do
    install -D -m 0644 "$1/$file" "$2/$file"
  done
}

copy_libraries "$qemu"

module_dir=""
for candidate in "$prefix"/lib/*/qemu "$prefix"/lib64/qemu "$prefix"/lib/qemu; do
  if compgen -G "$candidate/*.so" >/dev/null; then
    module_dir=$candidate
    break
  fi
done
if [ -n "$module_dir" ]; then
  copy_tree "$module_dir" "$dest/${module_dir#"$prefix"/}"
  for module in "$module_dir"/*.so; do
    copy_libraries "$module"
  done
fi

data_options=""
for data in $("$qemu" -L help); do
  [ -d "$data" ] || continue
  relative=$(realpath --relative-to="$prefix" "$data")
  copy_tree "$data" "$dest/$relative"
  data_options="$data_options -L \"\$here/$relative\""
done

cat > "$dest/qemu-system-x86_64" <<EOF
#!/bin/sh
# qemu-system-x86_64 $("$qemu" --version | head -n 1 | sed 's/^QEMU emulator version //'), bundled by
# .clusterfuzzlite/bundle_qemu.sh with its libraries, modules and firmware.
# The runner's fuzzer wrapper preloads its sanitizer runtime; QEMU is not built with it.
unset LD_PRELOAD
here=\$(dirname "\$(readlink -f "\$0")")
LD_LIBRARY_PATH="\$here/lib"
QEMU_MODULE_DIR="\$here/${module_dir#"$prefix"/}"
export LD_LIBRARY_PATH QEMU_MODULE_DIR
exec "\$here/bin/qemu-system-x86_64"$data_options "\$@"
EOF
chmod +x "$dest/qemu-system-x86_64"

"$dest/qemu-system-x86_64" --version | head -n 1
echo "bundle_qemu.sh: $qemu in $dest ($(du -sh "$dest" | cut -f1), $(ls "$dest/lib" | wc -l) libraries," \
     "modules from ${module_dir:-nowhere})"
