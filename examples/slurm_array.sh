#!/usr/bin/env bash
# One part of a facecurate stage per Slurm array task, on storage every node sees.
#
#   sbatch --array=1-64 examples/slurm_array.sh align /shared/raw /shared/out
#   sbatch --array=1-64 examples/slurm_array.sh embed /shared/out
#   # after each array has finished: one plain run merges (and redoes any missing shard)
#   facecurate align /shared/raw /shared/out
#   facecurate embed /shared/out
#
# Task K of an array of N runs `--part K/N`: the shards whose index is K-1 modulo N.
# Parts never write the same file; the last part to finish merges, or the plain run
# does. A task that dies is simply rerun (its finished shards are kept).
#SBATCH --job-name=facecurate
#SBATCH --cpus-per-task=16
#SBATCH --mem=16G
#SBATCH --time=04:00:00
#SBATCH --output=facecurate-%A_%a.log
set -euo pipefail

stage=${1:?usage: slurm_array.sh align RAW OUT | embed OUT}
shift
: "${SLURM_ARRAY_TASK_ID:?run under sbatch --array=1-N}"
N=${SLURM_ARRAY_TASK_COUNT:-$(( SLURM_ARRAY_TASK_MAX - SLURM_ARRAY_TASK_MIN + 1 ))}
K=$(( SLURM_ARRAY_TASK_ID - ${SLURM_ARRAY_TASK_MIN:-1} + 1 ))

# The venv lives on the shared file system, at the same path on every node.
. "${FACECURATE_VENV:-$HOME/facecurate/.venv}/bin/activate"

exec facecurate "$stage" "$@" --part "$K/$N" --workers "${SLURM_CPUS_PER_TASK:-1}" --json
