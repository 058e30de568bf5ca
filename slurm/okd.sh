#!/bin/bash
# Distil on a SLURM cluster: one task per GPU, launched by srun, preemption-safe.
#
#   sbatch slurm/okd.sh [CONFIG] [key=value ...]            # from the repository root
#   sbatch --nodes=4 slurm/okd.sh configs/my_run.yaml train.max_steps=20000
#
# Site settings: edit the #SBATCH lines below (or pass the same options to sbatch, which override them),
# and set PYTHON (the environment's interpreter) and OKD_ROOT (this repository) when the defaults do not fit.
#
# Preemption and time limits: SLURM sends USR1 to this batch shell (--signal=B:USR1@...) before the end;
# the trap forwards it to the trainer, which finishes its step, writes a checkpoint and exits 75; this
# script then requeues the job (--requeue), which resumes from output_dir/checkpoints/latest (resume: auto).
# A SIGTERM from scancel or the time limit takes the same path when the trainer has time to save.
#
#SBATCH --job-name=okd
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --time=24:00:00
#SBATCH --signal=B:USR1@600
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm/logs/%x-%j.out

set -uo pipefail

OKD_ROOT=${OKD_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}
PYTHON=${PYTHON:-python}
CONFIG=${1:-$OKD_ROOT/configs/demo.yaml}
[ $# -gt 0 ] && shift

# The rendezvous: the first node of the allocation, by address (simulated or DNS-less nodes have no
# resolvable name); a port derived from the job id, so jobs sharing a node do not collide.
first=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)
MASTER_ADDR=$(scontrol show node "$first" | sed -n 's/.*NodeAddr=\([^ ]*\).*/\1/p')
export MASTER_ADDR=${MASTER_ADDR:-$first}
export MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}

echo "[okd.sh] job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}): $SLURM_NNODES node(s), $SLURM_NTASKS tasks," \
     "rendezvous $MASTER_ADDR:$MASTER_PORT, config $CONFIG $*"

# One task per GPU; each maps SLURM's numbering onto torch.distributed's variables.
srun --kill-on-bad-exit=1 bash -c '
  export RANK=$SLURM_PROCID WORLD_SIZE=$SLURM_NTASKS LOCAL_RANK=$SLURM_LOCALID
  export LOCAL_WORLD_SIZE=${SLURM_NTASKS_PER_NODE%%(*}
  exec "$0" "$@"' "$PYTHON" "$OKD_ROOT/okd_scale/train.py" --config "$CONFIG" "$@" &
srun_pid=$!

preempted=0
trap 'preempted=1; echo "[okd.sh] USR1: the trainer checkpoints and stops"; kill -USR1 "$srun_pid" 2>/dev/null' USR1
trap 'echo "[okd.sh] TERM: passing it to the trainer"; kill -TERM "$srun_pid" 2>/dev/null' TERM

while kill -0 "$srun_pid" 2>/dev/null; do  # `wait` returns early when a trapped signal arrives
  wait "$srun_pid"
done
wait "$srun_pid"; rc=$?  # srun's own status, which bash kept

# Requeue after a USR1 unless the run is done (0) or its input is bad (2): 75 means the trainer saved a
# checkpoint first; any other status resumes from the last checkpoint it had.
if [ "$preempted" = 1 ] && [ "$rc" != 0 ] && [ "$rc" != 2 ]; then
  echo "[okd.sh] trainer stopped with status $rc; requeueing job $SLURM_JOB_ID"
  scontrol requeue "$SLURM_JOB_ID"
  exit 0
fi
echo "[okd.sh] trainer exited with status $rc"
exit "$rc"
