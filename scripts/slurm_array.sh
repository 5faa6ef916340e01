#!/usr/bin/env bash
# Run conus on a SLURM cluster: one participant per array task, then one group-level job.
#
#   scripts/slurm_array.sh submit BIDS_DIR OUTPUT_DIR [conus options...]
#
# submits
#   1. an array job with one task per row of BIDS_DIR/participants.tsv (column participant_id);
#      task i runs `conus BIDS_DIR OUTPUT_DIR participant --participant_label <row i> [options]`
#      and nothing else, so each task processes only its own participant;
#   2. a group-level job (`conus BIDS_DIR OUTPUT_DIR group`) that starts after every array task
#      has ended (afterany: the group report lists what was written, failed runs included).
# All tasks write into the same OUTPUT_DIR; conus writes every file atomically and the shared
# dataset_description.json once, so concurrent tasks lose nothing.
#
# Environment (all optional):
#   CONUS_SIF          an Apptainer image (conus.sif); unset = the `conus` command on PATH
#   CONUS_SBATCH_ARGS  extra sbatch options, e.g. "--account=abc --partition=cpu"
#   CONUS_CPUS         CPUs per task (default 2; passed on as --n_cpus)
#   CONUS_MEM          memory per task (default 4G)
#   CONUS_TIME         time limit per task (default 01:00:00)
#   CONUS_MAX_PARALLEL at most this many array tasks at once (default: no limit)
#   CONUS_LOG_DIR      where SLURM writes its logs (default ./conus-slurm-logs, outside OUTPUT_DIR)
# The `task` and `group` sub-commands are what the submitted jobs run; they are not meant to be
# called by hand, except to debug one task: SLURM_ARRAY_TASK_ID=3 scripts/slurm_array.sh task ...
set -euo pipefail

usage() {
    sed -n '2,25p' "$0" >&2
    exit 64
}

die() {
    echo "slurm_array.sh: $1" >&2
    exit "${2:-64}"
}

# Print the participant labels of participants.tsv, one per line, without the sub- prefix.
participant_labels() {
    local tsv="$1/participants.tsv"
    [[ -r "$tsv" ]] || die "$tsv not found: it lists the participants, one array task each" 66
    awk -F'\t' '
        NR == 1 { for (i = 1; i <= NF; i++) { gsub(/\r/, "", $i); if ($i == "participant_id") col = i }
                  if (!col) { print "no participant_id column" > "/dev/stderr"; exit 65 }
                  next }
        { gsub(/\r/, "", $col) }
        $col != "" { label = $col; if (substr(label, 1, 4) == "sub-") label = substr(label, 5); print label }
    ' "$tsv"
}

# Fill the array `labels` from participants.tsv (exits with the helper's code on error).
load_labels() {
    local text
    text="$(participant_labels "$1")"
    labels=()
    if [[ -n "$text" ]]; then mapfile -t labels <<<"$text"; fi
}

# Run conus, directly or through Apptainer with the data, output and a per-job /tmp bound.
run_conus() {
    if [[ -n "${CONUS_SIF:-}" ]]; then
        local tmp="${SLURM_TMPDIR:-${TMPDIR:-/tmp}}/conus-${SLURM_JOB_ID:-$$}-${SLURM_ARRAY_TASK_ID:-0}"
        mkdir -p "$tmp" "$out"
        apptainer run --containall --bind "$bids:$bids:ro" --bind "$out:$out" --bind "$tmp:/tmp" \
            "$CONUS_SIF" "$@"
    else
        conus "$@"
    fi
}

[[ $# -ge 3 ]] || usage
mode="$1"
bids="$(readlink -f "$2")"
out="$(readlink -f "$3")"
shift 3
[[ -d "$bids" ]] || die "BIDS_DIR $bids is not a folder" 66

case "$mode" in
    submit)
        load_labels "$bids"
        n="${#labels[@]}"
        [[ "$n" -gt 0 ]] || die "no participants in $bids/participants.tsv" 18
        cpus="${CONUS_CPUS:-2}"
        logs="$(readlink -f "${CONUS_LOG_DIR:-conus-slurm-logs}")"
        mkdir -p "$logs"
        array="1-$n"
        if [[ -n "${CONUS_MAX_PARALLEL:-}" ]]; then array="$array%$CONUS_MAX_PARALLEL"; fi
        self="$(readlink -f "$0")"
        # shellcheck disable=SC2086  # CONUS_SBATCH_ARGS is a list of options on purpose
        array_id=$(sbatch --parsable --job-name=conus-participant --array="$array" \
            --cpus-per-task="$cpus" --mem="${CONUS_MEM:-4G}" --time="${CONUS_TIME:-01:00:00}" \
            --output="$logs/participant-%A_%a.log" ${CONUS_SBATCH_ARGS:-} \
            "$self" task "$bids" "$out" --n_cpus "$cpus" "$@")
        array_id="${array_id%%;*}"
        # shellcheck disable=SC2086
        group_id=$(sbatch --parsable --job-name=conus-group --dependency="afterany:$array_id" \
            --cpus-per-task=1 --mem="${CONUS_MEM:-4G}" --time="${CONUS_TIME:-01:00:00}" \
            --output="$logs/group-%j.log" ${CONUS_SBATCH_ARGS:-} \
            "$self" group "$bids" "$out")
        group_id="${group_id%%;*}"
        echo "submitted $n participant tasks as array job $array_id; group job $group_id runs after it"
        ;;
    task)
        [[ -n "${SLURM_ARRAY_TASK_ID:-}" ]] || die "task mode needs SLURM_ARRAY_TASK_ID"
        load_labels "$bids"
        idx="$SLURM_ARRAY_TASK_ID"
        [[ "$idx" =~ ^[0-9]+$ && "$idx" -ge 1 && "$idx" -le "${#labels[@]}" ]] \
            || die "array index $idx outside 1..${#labels[@]} (participants.tsv changed since submit?)"
        label="${labels[$((idx - 1))]}"
        echo "array task $idx: participant $label"
        run_conus "$bids" "$out" participant --participant_label "$label" "$@"
        ;;
    group)
        run_conus "$bids" "$out" group "$@"
        ;;
    *)
        usage
        ;;
esac
