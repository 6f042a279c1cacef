#!/usr/bin/env bash
# Sends `iil-dist train CONFIG [overrides...]` to a running Ray cluster as a Ray job. See --help.
#
# The job runs in a copy of this repository (`--working-dir`, without .venv, data, runs, wandb and
# .git), so CONFIG is a path inside the repository, e.g. configs/imagenet1k.yaml.
#
# What happens to the wandb key. WANDB_API_KEY, WANDB_ENTITY, WANDB_PROJECT and WANDB_MODE, when set
# here, travel in the job's runtime env (`env_vars`). This script hands the runtime env to `ray`
# through a pipe (`--runtime-env /dev/fd/N`), so the key is in no command line (`ps`) and in no file,
# and it prints the key as `***`. Ray itself does not treat env_vars as secret: it sends the runtime
# env to the cluster in the submission request (plain HTTP unless the address is https or goes
# through an SSH tunnel such as `ray dashboard`), keeps it in the job table on the head node, and
# gives it back in clear text to anyone who can reach the dashboard port, e.g. with `ray job list` or
# the jobs REST API (in Ray 2.60 only the dashboard's web page masks env_vars values). The driver and
# every worker process also hold it in their environment. On a cluster other people use, give the key
# to the nodes instead (a Kubernetes Secret, as in launch/rayjob.yaml), leave WANDB_API_KEY unset here
# and export WANDB_MODE=online.
#
# Written for bash 3.2 too (macOS), hence no associative arrays and the ${a[@]+...} guards.
set -euo pipefail
# `bash -x launch/submit.sh` would trace the key while the runtime env is written: tracing stays off
{ set +x; } 2>/dev/null

readonly SECRET_VARS="WANDB_API_KEY"
readonly PASSED_VARS="WANDB_API_KEY WANDB_ENTITY WANDB_PROJECT WANDB_MODE"
# gitignore-style, relative to the repository root; the leading / anchors a pattern there, so the
# package folder iil_dist/data/ is uploaded while the scenario folder data/ is not
readonly EXCLUDES="/.venv /data /runs /wandb /.git /.pytest_cache /.ruff_cache __pycache__"
readonly DEFAULT_ADDRESS=http://127.0.0.1:8265

usage() {
    cat <<'EOF'
usage: launch/submit.sh [options] CONFIG [dotted.overrides ...]
       launch/submit.sh [options] --resume RUN_DIR [overrides ...]

Submits `iil-dist train CONFIG [overrides]` (or `iil-dist train --resume RUN_DIR [overrides]`) to a
running Ray cluster with `ray job submit`, from a copy of this repository. CONFIG is relative to the
repository root.

options:
  --address URL     the cluster's job server (dashboard) address; default: $RAY_ADDRESS, else
                    http://127.0.0.1:8265 (where `ray dashboard launch/aws-gpu-cluster.yaml` forwards it)
  --resume RUN_DIR  continue the run in RUN_DIR (a path on the cluster's shared storage)
  --no-wait         return once the job is submitted instead of following its log
  --dry-run         print the command and the runtime env (secrets masked); run nothing
  -h, --help        show this help

Passed to the job when set: WANDB_API_KEY (printed as ***), WANDB_ENTITY, WANDB_PROJECT, WANDB_MODE.
With neither WANDB_API_KEY nor WANDB_MODE set, the job gets WANDB_MODE=offline.
EOF
}

die() {
    printf 'submit.sh: %s\n' "$*" >&2
    exit 2
}

is_secret() {
    case " $SECRET_VARS " in
        *" $1 "*) return 0 ;;
        *) return 1 ;;
    esac
}

# A JSON string literal for $1. printf is a shell builtin: values never reach a process's argv.
json_str() {
    local s=$1
    s=${s//\\/\\\\}
    s=${s//\"/\\\"}
    s=${s//$'\n'/\\n}
    s=${s//$'\r'/\\r}
    s=${s//$'\t'/\\t}
    printf '"%s"' "$s"
}

# The job's runtime env as JSON; `runtime_env_json mask` writes secret values as ***.
runtime_env_json() {
    local mask=${1:-} sep="" i value pattern
    printf '{\n  "excludes": ['
    for pattern in $EXCLUDES; do
        printf '%s' "$sep"
        json_str "$pattern"
        sep=", "
    done
    printf '],\n  "env_vars": {'
    sep=""
    for i in "${!env_names[@]}"; do
        value=${env_values[$i]}
        if [[ $mask == mask ]] && is_secret "${env_names[$i]}"; then value='***'; fi
        printf '%s\n    ' "$sep"
        json_str "${env_names[$i]}"
        printf ': '
        json_str "$value"
        sep=,
    done
    printf '\n  }\n}\n'
}

add_env() {
    env_names+=("$1")
    env_values+=("$2")
}

address=${RAY_ADDRESS:-}
dry_run=0
resume=""
wait_opt=()
positional=()
while (($# > 0)); do
    case $1 in
        -h | --help)
            usage
            exit 0
            ;;
        --address)
            (($# >= 2)) || die "--address needs a value, e.g. --address http://HEAD_IP:8265"
            address=$2
            shift 2
            ;;
        --address=*)
            address=${1#*=}
            shift
            ;;
        --resume)
            (($# >= 2)) || die "--resume needs a run directory, e.g. --resume /mnt/shared/runs/NAME"
            resume=$2
            shift 2
            ;;
        --resume=*)
            resume=${1#*=}
            shift
            ;;
        --dry-run)
            dry_run=1
            shift
            ;;
        --no-wait)
            wait_opt=(--no-wait)
            shift
            ;;
        --)
            shift
            positional+=("$@")
            break
            ;;
        -*) die "unknown option $1 (see --help)" ;;
        *)
            positional+=("$1")
            shift
            ;;
    esac
done

repo_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)
address=${address:-$DEFAULT_ADDRESS}

# what the job runs, in its copy of the repository
train=(iil-dist train)
if [[ -n $resume ]]; then
    train+=(--resume "$resume")
elif ((${#positional[@]} == 0)); then
    die "no config given: pass a recipe such as configs/imagenet1k.yaml, or --resume RUN_DIR (see --help)"
elif [[ ${positional[0]} != /* && ! -f $repo_root/${positional[0]} ]]; then
    die "config ${positional[0]} not found in $repo_root: the job runs in a copy of the repository," \
        "so give the recipe's path relative to the repository root, e.g. configs/imagenet1k.yaml"
fi
train+=(${positional[@]+"${positional[@]}"})

# The job's environment. RAY_OVERRIDE_JOB_RUNTIME_ENV=1: the driver calls ray.init with env_vars of
# its own (WANDB_MODE, RAY_USAGE_STATS_ENABLED, ... taken from this environment), and Ray refuses a
# driver runtime env that repeats a key of the job's unless this is set.
env_names=()
env_values=()
add_env RAY_USAGE_STATS_ENABLED 0
add_env RAY_OVERRIDE_JOB_RUNTIME_ENV 1
for name in $PASSED_VARS; do
    if [[ -n ${!name:-} ]]; then add_env "$name" "${!name}"; fi
done
if [[ -z ${WANDB_API_KEY:-} && -z ${WANDB_MODE:-} ]]; then
    # a recipe that asks for online wandb would otherwise fail at its first step for want of a key
    add_env WANDB_MODE offline
fi

shown_env=()
for i in "${!env_names[@]}"; do
    if is_secret "${env_names[$i]}"; then value='***'; else value=${env_values[$i]}; fi
    shown_env+=("${env_names[$i]}=$value")
done
printf 'submit.sh: job env: %s\n' "${shown_env[*]}"
printf 'submit.sh: running:'
printf ' %q' ray job submit --address "$address" --working-dir "$repo_root" --runtime-env /dev/fd/N \
    ${wait_opt[@]+"${wait_opt[@]}"} -- "${train[@]}"
printf '\n'

if ((dry_run)); then
    printf 'submit.sh: runtime env (secrets masked; /dev/fd/N is a pipe that holds it unmasked):\n'
    runtime_env_json mask
    exit 0
fi

command -v ray >/dev/null 2>&1 ||
    die "ray is not on PATH: install the Ray CLI of the cluster's version, e.g. pip install 'ray[default]==2.60.0'"
export RAY_USAGE_STATS_ENABLED=0
# The runtime env goes through a pipe that only `ray` holds (process substitution; Ray reads the
# --runtime-env file once, when it submits): no file to protect or remove, and `ps` shows /dev/fd/N.
ray job submit --address "$address" --working-dir "$repo_root" --runtime-env <(runtime_env_json) \
    ${wait_opt[@]+"${wait_opt[@]}"} -- "${train[@]}"
