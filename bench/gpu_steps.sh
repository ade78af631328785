# Sourced by the bench/*_gpu.sh scripts: `step NAME SECONDS COMMAND...` runs one bounded step, logs it to
# $out/NAME.log, prints its time and its log's tail when it fails, and sets status=1 then (the next steps run
# anyway). The caller sets `out` and `status=0` first.
step() {
  local name=$1 limit=$2
  shift 2
  local t0=$SECONDS
  timeout --kill-after=10 "$limit" "$@" > "$out/$name.log" 2>&1 || { status=1; echo "$name failed:"; tail -15 "$out/$name.log"; }
  echo "$name: $((SECONDS - t0)) s"
}
