# Shared by the array jobs (prepare.sbatch, infer.sbatch): sourced from the checkout after `cd "$REPO"`, because
# SLURM runs a copy of the batch script from its spool folder, where nothing sits beside it.

# PYTHON (the checkout's .venv unless set) must exist; offline, one OpenMP thread per CPU of the task.
array_setup() {
  PYTHON=${PYTHON:-$REPO/.venv/bin/python}
  if [ ! -x "$PYTHON" ]; then
    echo "error: no Python at $PYTHON: run \`make install\` in $REPO, or set PYTHON to the interpreter to use" >&2
    exit 2
  fi
  export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}
}

# Sets `index` (0-based, whatever the range starts at) and `count` of this task. Arguments: SCRIPT (its name) HINT
# (what to run instead when it was not submitted as an array job).
array_task() {
  if [ -z "${SLURM_ARRAY_TASK_ID:-}" ]; then
    echo "error: $1 runs as an array job (#SBATCH --array); for one task use $2" >&2
    exit 2
  fi
  count=$SLURM_ARRAY_TASK_COUNT
  if [ $((SLURM_ARRAY_TASK_MAX - SLURM_ARRAY_TASK_MIN + 1)) -ne "$count" ]; then
    echo "error: --array must be a plain range like 0-15 (or 0-15%4), not a list or a step" >&2
    exit 2
  fi
  index=$((SLURM_ARRAY_TASK_ID - SLURM_ARRAY_TASK_MIN))
}

# The array's lowest task submits the join once (not again when it is requeued): a job on the same partition that
# starts when every task has succeeded (afterok) and is cancelled if one fails (--kill-on-invalid-dep), its log
# beside the tasks'. Arguments: LABEL (for the log line) COMMAND... (run in the checkout).
array_submit_join() {
  local label=$1 log_dir join_job
  shift
  [ "$index" = 0 ] && [ "${SLURM_RESTART_COUNT:-0}" = 0 ] || return 0
  log_dir=$(dirname "$(scontrol show job "$SLURM_JOB_ID" | grep -o 'StdOut=[^ ]*' | cut -d= -f2)")
  join_job=$(sbatch --parsable --dependency="afterok:$SLURM_ARRAY_JOB_ID" --kill-on-invalid-dep=yes \
    ${SLURM_JOB_PARTITION:+--partition="$SLURM_JOB_PARTITION"} \
    --job-name="${SLURM_JOB_NAME}-join" --ntasks=1 --cpus-per-task=1 --time=30:00 \
    --output="$log_dir/slurm-${SLURM_JOB_NAME}-join-%j.log" \
    --wrap "cd $(printf '%q' "$REPO") && $(printf '%q ' "$@")")
  echo "[$label] join job $join_job starts when every task of array job $SLURM_ARRAY_JOB_ID has succeeded"
}
