#!/usr/bin/env bash
# The cluster path on a real SLURM: install and start a one-node SLURM with accounting (munge,
# MariaDB, slurmdbd, slurmctld, slurmd on this machine; every config written here), run the
# pipeline tests' tiny config with `--workflow-profile profiles/slurm`, then check that every
# job went through sbatch (sacct lists them, all COMPLETED) and that the report's metrics
# equal those of a local run of the same config (started first, in the background).
#
#   .ci/slurm_test.sh          # run the test; the daemons are stopped at the end
#   .ci/slurm_test.sh start    # only start the cluster (sinfo, sbatch, sacct work), leave it up
#   .ci/slurm_test.sh stop     # stop what this script started (by its pid files)
#
# Needs root and apt (Debian/Ubuntu): without them it prints why and exits 0 (skipped); so it
# does with LINGSHU_SLURM_TEST=skip, and where /etc/slurm holds a config it did not write.
# It writes /etc/slurm/{slurm,slurmdbd}.conf and a fresh /etc/munge/munge.key; everything else
# lives under $STATE, wiped on each run: the daemons' logs and pid files, a private MariaDB
# (its own data directory, on 127.0.0.1:$DBPORT), SLURM's state and the runs' files.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
HERE="$ROOT/.ci/slurm"
STATE=${LINGSHU_SLURM_STATE:-/var/tmp/lingshu-slurm-ci}
CLUSTER=lingshu-ci
ACCOUNT=lingshu   # profiles/slurm's default account
PARTITION=cpu     # profiles/slurm's default partition
DB=slurm_acct_db
DBPORT=${LINGSHU_SLURM_DBPORT:-3316}
MARK="# written by lingshu-bench .ci/slurm_test.sh"
T0=$SECONDS

say() { echo "[slurm-test $(( SECONDS - T0 ))s] $*"; }
skip() { echo "SLURM test SKIPPED: $*"; exit 0; }
fail() {
    echo "SLURM test FAILED: $*" >&2
    for log in "$STATE"/*/*.log; do
        [ -s "$log" ] && { echo "--- tail of $log" >&2; tail -n 15 "$log" >&2; }
    done
    exit 1
}

# ---- stopping: only the processes whose pid files this script wrote --------------------------
stop_pid() {  # name pidfile
    local pid
    [ -s "$2" ] || return 0
    pid=$(cat "$2")
    if kill -0 "$pid" 2>/dev/null; then
        kill "$pid" 2>/dev/null || true
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
        kill -0 "$pid" 2>/dev/null && { echo "  $1 ($pid) did not stop; killing"; kill -9 "$pid" || true; }
    fi
    rm -f "$2"
}
stop_all() {
    # Jobs still on the cluster (a failed run) first, while slurmctld can cancel them.
    if [ -s "$STATE/slurm/slurmctld.pid" ] && kill -0 "$(cat "$STATE/slurm/slurmctld.pid")" 2>/dev/null; then
        scancel -u "$(id -un)" 2>/dev/null || true
        for _ in $(seq 25); do [ -z "$(squeue -h 2>/dev/null)" ] && break; sleep 0.2; done
    fi
    stop_pid slurmd "$STATE/slurm/slurmd.pid"
    stop_pid slurmctld "$STATE/slurm/slurmctld.pid"
    stop_pid slurmdbd "$STATE/slurm/slurmdbd.pid"
    stop_pid mariadbd "$STATE/mysqld/mariadbd.pid"
    stop_pid munged "$STATE/munge/munged.pid"
}
MODE=${1:-run}
case $MODE in
    stop) stop_all; echo "stopped what $0 started"; exit 0 ;;
    run|start) ;;
    *) echo "usage: $0 [run|start|stop]" >&2; exit 2 ;;
esac

# ---- can SLURM run here? --------------------------------------------------------------------
[ "${LINGSHU_SLURM_TEST:-}" = skip ] && skip "LINGSHU_SLURM_TEST=skip"
[ "$(uname -s)" = Linux ] || skip "not Linux"
[ "$(id -u)" = 0 ] || skip "needs root to install and start the SLURM daemons (run it as root)"
for conf in /etc/slurm/slurm.conf /etc/slurm/slurmdbd.conf; do
    if [ -e "$conf" ] && ! head -n 1 "$conf" | grep -qF "$MARK"; then
        skip "$conf exists and was not written by this script; not touching this machine's SLURM"
    fi
done
if [ -z "${VIRTUAL_ENV:-}" ] && [ -f "$ROOT/.venv/bin/activate" ]; then . "$ROOT/.venv/bin/activate"; fi
python -c "import importlib.util as u, sys; sys.exit(not u.find_spec('snakemake_executor_plugin_slurm'))" \
    || fail "snakemake-executor-plugin-slurm is not installed (pip install -e .)"

# Stop what an earlier run may have left, then start from a clean state directory.
stop_all
rm -rf "$STATE"
mkdir -p "$STATE"/{slurm/ctld,slurm/spool,munge,mysqld,work}
say "state directory $STATE"

# The local reference run starts first, in the background: it needs no SLURM, and its CPU
# time overlaps the package installation and the cluster's start.
WORK=$STATE/work
LOCAL_PID=""
if [ "$MODE" = run ]; then
    python "$HERE/tiny_config.py" "$WORK/local-results" "$WORK/local.yaml"
    python "$HERE/tiny_config.py" "$WORK/slurm-results" "$WORK/slurm.yaml"
    mkdir -p "$WORK/local" "$WORK/slurm"
    ( cd "$WORK/local" && exec python -m snakemake --snakefile "$ROOT/Snakefile" \
        --directory "$WORK/local" --configfile "$WORK/local.yaml" --cores 2 ) \
        > "$WORK/local-run.log" 2>&1 &
    LOCAL_PID=$!
fi
on_exit() {
    if [ -n "$LOCAL_PID" ]; then kill "$LOCAL_PID" 2>/dev/null || true; fi
    if [ "${LINGSHU_SLURM_KEEP:-}" = 1 ]; then echo "services left running; stop them with: $0 stop"; else stop_all; fi
}
trap on_exit EXIT

# ---- install ---------------------------------------------------------------------------------
PKGS="munge mariadb-server slurmdbd slurmctld slurmd slurm-client"
need_install=0
for bin in munged mungekey mariadbd slurmdbd slurmctld slurmd sbatch sacct sacctmgr; do
    command -v "$bin" >/dev/null || PATH=$PATH:/usr/sbin command -v "$bin" >/dev/null || need_install=1
done
export PATH=$PATH:/usr/sbin:/sbin
if [ $need_install = 1 ]; then
    command -v apt-get >/dev/null || skip "no apt-get to install $PKGS"
    say "apt-get install $PKGS"
    # No service may start at install time (this script starts them with its own configs).
    policy_added=0
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d; chmod +x /usr/sbin/policy-rc.d
        policy_added=1
    fi
    if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
            --no-install-recommends $PKGS; } > "$WORK/apt.log" 2>&1; then
        [ $policy_added = 1 ] && rm -f /usr/sbin/policy-rc.d
        tail -n 20 "$WORK/apt.log"
        skip "apt-get could not install $PKGS (log above)"
    fi
    [ $policy_added = 1 ] && rm -f /usr/sbin/policy-rc.d
fi
SLURM_VERSION=$(slurmd -V)
say "installed: $SLURM_VERSION, $(mariadbd --version | awk '{print $3}'), munge $(munged -V | awk '{print $1}')"

# Services a systemd may have started at install time use the same sockets and ports.
if [ -d /run/systemd/system ]; then
    for unit in slurmd slurmctld slurmdbd munge; do systemctl stop "$unit" 2>/dev/null || true; done
fi
for d in slurmd slurmctld slurmdbd; do
    pgrep -x "$d" >/dev/null && fail "a $d not started by this script is running (pid $(pgrep -x "$d" | tr '\n' ' '))"
done
chmod 755 "$STATE"
chown -R slurm:slurm "$STATE/slurm"; chown munge:munge "$STATE/munge"; chown mysql "$STATE/mysqld"
chmod 700 "$STATE/munge"

# ---- munge -------------------------------------------------------------------------------
if pgrep -x munged >/dev/null; then fail "a munged not started by this script is running"; fi
install -d -o munge -g munge -m 0700 /etc/munge
install -d -o munge -g munge -m 0755 /run/munge
rm -f /etc/munge/munge.key
mungekey --create --keyfile /etc/munge/munge.key 2>/dev/null \
    || dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
chown munge:munge /etc/munge/munge.key; chmod 0400 /etc/munge/munge.key
runuser -u munge -- munged --log-file="$STATE/munge/munged.log" --pid-file="$STATE/munge/munged.pid" \
    || fail "munged did not start"
for _ in $(seq 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.1; done
munge -n | unmunge >/dev/null || fail "munge does not work"
say "munged up (fresh key)"

# ---- MariaDB: a private server for the accounting database -----------------------------------
mariadb-install-db --user=mysql --datadir="$STATE/mysqld/data" --skip-test-db \
    > "$STATE/mysqld/install.log" 2>&1 || fail "mariadb-install-db failed"
SOCK=$STATE/mysqld/mysqld.sock
setsid mariadbd --no-defaults --user=mysql --datadir="$STATE/mysqld/data" --socket="$SOCK" \
    --pid-file="$STATE/mysqld/mariadbd.pid" --log-error="$STATE/mysqld/mariadb.log" \
    --bind-address=127.0.0.1 --port="$DBPORT" --skip-name-resolve \
    --innodb-buffer-pool-size=64M --innodb-lock-wait-timeout=900 < /dev/null > /dev/null 2>&1 &
for _ in $(seq 150); do mariadb-admin --socket="$SOCK" ping >/dev/null 2>&1 && break; sleep 0.2; done
mariadb-admin --socket="$SOCK" ping >/dev/null 2>&1 || fail "MariaDB did not start"
DBPASS=$(head -c 18 /dev/urandom | base64 | tr -dc 'A-Za-z0-9')
mariadb --socket="$SOCK" -u root <<SQL || fail "could not create the accounting database"
CREATE DATABASE $DB;
CREATE USER 'slurm'@'127.0.0.1' IDENTIFIED BY '$DBPASS';
GRANT ALL ON $DB.* TO 'slurm'@'127.0.0.1';
SQL
say "MariaDB up (127.0.0.1:$DBPORT)"

# ---- configs -----------------------------------------------------------------------------
HOST=$(hostname -s)
# This machine's CPUs and topology as slurmd sees them; RealMemory a little under the total,
# so that slurmd never finds less than configured (which drains the node).
read -r -a NODE <<< "$(slurmd -C | head -n 1)"
HW=""; MEM=0
for kv in "${NODE[@]}"; do
    case $kv in
        NodeName=*) ;;
        RealMemory=*) MEM=${kv#RealMemory=} ;;
        *) HW="$HW $kv" ;;
    esac
done
MEM=$(( MEM > 2048 ? MEM - 512 : MEM ))
install -d -m 0755 /etc/slurm
cat > /etc/slurm/slurm.conf <<EOF
$MARK; rewritten on each run
ClusterName=$CLUSTER
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=slurm
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
ReturnToService=2
SlurmctldPidFile=$STATE/slurm/slurmctld.pid
SlurmdPidFile=$STATE/slurm/slurmd.pid
SlurmctldLogFile=$STATE/slurm/slurmctld.log
SlurmdLogFile=$STATE/slurm/slurmd.log
StateSaveLocation=$STATE/slurm/ctld
SlurmdSpoolDir=$STATE/slurm/spool
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
# Accounting: sacct (the plugin's job status) reads slurmdbd; jobs need a known account.
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStorageEnforce=associations
AccountingStoreFlags=job_comment
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=30
JobCompType=jobcomp/none
NodeName=$HOST NodeAddr=127.0.0.1$HW RealMemory=$MEM State=UNKNOWN
PartitionName=$PARTITION Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
EOF
chmod 644 /etc/slurm/slurm.conf
(umask 077; cat > /etc/slurm/slurmdbd.conf <<EOF
$MARK; rewritten on each run
AuthType=auth/munge
DbdHost=localhost
SlurmUser=slurm
PidFile=$STATE/slurm/slurmdbd.pid
LogFile=$STATE/slurm/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DBPORT
StorageUser=slurm
StoragePass=$DBPASS
StorageLoc=$DB
EOF
)
chown slurm:slurm /etc/slurm/slurmdbd.conf; chmod 600 /etc/slurm/slurmdbd.conf
export SLURM_CONF=/etc/slurm/slurm.conf

# ---- slurmdbd, the cluster's associations, slurmctld, slurmd ---------------------------------
slurmdbd || fail "slurmdbd did not start"
for _ in $(seq 100); do sacctmgr -n list cluster >/dev/null 2>&1 && break; sleep 0.2; done
sacctmgr -n list cluster >/dev/null 2>&1 || fail "slurmdbd does not answer"
say "slurmdbd up"
USER_NAME=$(id -un)
{ sacctmgr -i add cluster "$CLUSTER" \
  && sacctmgr -i add account "$ACCOUNT" Cluster="$CLUSTER" Description="lingshu-bench CI" Organization=lingshu \
  && sacctmgr -i add user "$USER_NAME" Account="$ACCOUNT" DefaultAccount="$ACCOUNT" Cluster="$CLUSTER"; } \
    > "$STATE/slurm/sacctmgr.log" 2>&1 || fail "sacctmgr: $(cat "$STATE/slurm/sacctmgr.log")"
slurmctld -c || fail "slurmctld did not start"
slurmd || fail "slurmd did not start"
for _ in $(seq 150); do
    state=$(sinfo -h -n "$HOST" -o %T 2>/dev/null || true)
    [ "$state" = idle ] && break; sleep 0.2
done
[ "$state" = idle ] || fail "node $HOST is '${state:-unknown}', not idle"
say "cluster $CLUSTER up: $(sinfo -h -o '%P %D node(s) %c CPUs %m MB %T')"

if [ "$MODE" = start ]; then
    trap - EXIT
    echo "SLURM is up (account $ACCOUNT, partition $PARTITION); stop it with: $0 stop"; exit 0
fi

# ---- the pipeline through SLURM ------------------------------------------------------------
cd "$WORK/slurm"
SMK=(python -m snakemake --snakefile "$ROOT/Snakefile" --directory "$WORK/slurm"
     --workflow-profile "$ROOT/profiles/slurm" --configfile "$WORK/slurm.yaml"
     # Poll sacct every few seconds, not the plugin's 40 s (a tiny job takes seconds).
     --slurm-init-seconds-before-status-checks 3 --slurm-keep-successful-logs)
"${SMK[@]}" -n > "$WORK/planned.txt" 2>&1 || { cat "$WORK/planned.txt"; fail "dry run failed"; }
say "submitting through profiles/slurm (account $ACCOUNT, partition $PARTITION)"
T_SLURM=$SECONDS; SINCE=$(date +%Y-%m-%dT%H:%M:%S)
if ! "${SMK[@]}" > "$WORK/slurm-run.log" 2>&1; then
    tail -n 60 "$WORK/slurm-run.log"
    fail "snakemake with profiles/slurm failed (log: $WORK/slurm-run.log)"
fi
T_SLURM=$(( SECONDS - T_SLURM ))
sacct -a -X -n -P -S "$SINCE" -o JobID,State,ExitCode,Comment > "$WORK/sacct.txt"
say "SLURM run done in ${T_SLURM}s; waiting for the local run"
wait "$LOCAL_PID" || { tail -n 40 "$WORK/local-run.log"; fail "the local run failed"; }
LOCAL_PID=""

DS=$(python -c "import yaml,sys; print(next(iter(yaml.safe_load(open(sys.argv[1]))['datasets'])))" "$WORK/slurm.yaml")
echo "==== SLURM test summary ($SLURM_VERSION, accounting: slurmdbd over MariaDB)"
sacct -a -X -S "$SINCE" -o JobID%5,Account%8,Partition%9,AllocCPUS%9,ReqMem%7,Elapsed,State,ExitCode,Comment%52
ok=0
python "$HERE/compare.py" "$WORK/local-results/$DS/report/table.tsv" \
    "$WORK/slurm-results/$DS/report/table.tsv" "$WORK/planned.txt" "$WORK/sacct.txt" || ok=1
echo "time: SLURM run ${T_SLURM}s; whole script $(( SECONDS - T0 ))s (logs: $STATE/*/*.log)"
[ $ok = 0 ] || fail "see the PROBLEM lines above"
echo "SLURM test PASSED"
