#!/usr/bin/env bash
# Single-node SLURM cluster for CI on Debian 12 (Slurm 22.05), without systemd.
#   source slurm-ci.sh
#   slurm_install            # apt packages (idempotent)
#   slurm_up                 # munged + slurmctld + slurmd, waits for nodes idle
#   jid=$(sbatch --parsable job.sh); slurm_wait "$jid"   # rc = job's exit code
#   slurm_down               # stops everything it started (pid files)
# Tunables (env): SLURM_CI_DIR (/tmp/slurm-ci), SLURM_CI_NODES (1; >1 = several
# slurmd on this host, nodes n1..nN), SLURM_CI_CTLD_PORT (6817),
# SLURM_CI_SLURMD_PORT (6818, first of N consecutive ports),
# SLURM_CI_ACCOUNTING (0; 1 = also MariaDB + slurmdbd so that sacct works;
# DB on 127.0.0.1:SLURM_CI_DB_PORT (3307), slurmdbd on 6819).
SLURM_CI_DIR=${SLURM_CI_DIR:-/tmp/slurm-ci}

slurm_install() {
  local pkgs="slurmctld slurmd slurm-client munge" need=0 c
  [ "${SLURM_CI_ACCOUNTING:-0}" = 1 ] && pkgs="$pkgs slurmdbd mariadb-server"
  for c in slurmctld slurmd sbatch munged; do command -v $c >/dev/null || need=1; done
  if [ "${SLURM_CI_ACCOUNTING:-0}" = 1 ]; then
    for c in slurmdbd mariadbd; do command -v $c >/dev/null || need=1; done
  fi
  [ $need = 0 ] && return 0
  apt-get update -qq || return 1
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    $pkgs >/dev/null || return 1
}

slurm_up() {
  local D=$SLURM_CI_DIR N=${SLURM_CI_NODES:-1} H NCPU MEM i n
  local CP=${SLURM_CI_CTLD_PORT:-6817} DP=${SLURM_CI_SLURMD_PORT:-6818}
  slurm_down >/dev/null 2>&1                    # leftovers of an earlier run
  rm -rf "$D"; mkdir -p "$D"/{etc,log,run,ctld,spool,munge}
  H=$(hostname -s)
  NCPU=$(nproc)
  MEM=$(slurmd -C | sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p'); MEM=$((MEM * 9 / 10 / N))

  # munge with a private key/socket/pid under $D; daemon runs as root (--force)
  dd if=/dev/urandom of="$D/munge/munge.key" bs=1024 count=1 status=none
  chmod 0755 "$D/munge"; chmod 0400 "$D/munge/munge.key"
  munged --force --key-file="$D/munge/munge.key" --socket="$D/munge/munge.sock" \
         --pid-file="$D/munge/munged.pid" --log-file="$D/log/munged.log" \
         --seed-file="$D/munge/munged.seed" || return 1

  cat > "$D/etc/slurm.conf" <<EOF
ClusterName=ci
SlurmctldHost=$H
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$D/munge/munge.sock
SlurmctldPort=$CP
StateSaveLocation=$D/ctld
SlurmdSpoolDir=$D/spool/%n
SlurmctldPidFile=$D/run/slurmctld.pid
SlurmdPidFile=$D/run/slurmd-%n.pid
SlurmctldLogFile=$D/log/slurmctld.log
SlurmdLogFile=$D/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
MailProg=/bin/true
ReturnToService=2
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
MinJobAge=300
KillWait=5
Waittime=0
EOF
  if [ "$N" -le 1 ]; then
    echo "NodeName=$H NodeAddr=127.0.0.1 Port=$DP CPUs=$NCPU RealMemory=$MEM State=UNKNOWN" >> "$D/etc/slurm.conf"
  else  # N slurmd daemons on this host, one port each; names are not in DNS
    echo "NodeName=n[1-$N] NodeHostname=$H NodeAddr=127.0.0.1 Port=[$DP-$((DP + N - 1))] CPUs=$NCPU RealMemory=$MEM State=UNKNOWN" >> "$D/etc/slurm.conf"
  fi
  echo "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP" >> "$D/etc/slurm.conf"
  export SLURM_CONF="$D/etc/slurm.conf"

  if [ "${SLURM_CI_ACCOUNTING:-0}" = 1 ]; then
    _slurm_accounting_up || return 1
  fi
  slurmctld -f "$SLURM_CONF" || return 1        # daemonizes, writes pid file
  if [ "$N" -le 1 ]; then
    slurmd -f "$SLURM_CONF" || return 1
  else
    for n in $(seq 1 "$N"); do slurmd -f "$SLURM_CONF" -N "n$n" || return 1; done
  fi
  for i in $(seq 1 120); do                       # wait until all nodes are idle
    [ "$(sinfo -h -N -t idle -o '%N' 2>/dev/null | wc -l)" -ge "$N" ] && return 0
    sleep 0.5
  done
  echo "slurm did not come up" >&2; sinfo -N -l >&2; tail -n 30 "$D"/log/*.log >&2
  return 1
}

# MariaDB (private datadir, TCP on 127.0.0.1 only) + slurmdbd, so sacct works.
_slurm_accounting_up() {
  local D=$SLURM_CI_DIR DBP=${SLURM_CI_DB_PORT:-3307} i
  mkdir -p "$D/db"
  mariadb-install-db --no-defaults --user=root --datadir="$D/db/data" \
    --auth-root-authentication-method=normal --skip-test-db \
    >"$D/log/mariadb-install.log" 2>&1 || return 1
  # mariadbd does not daemonize: plain background process, pid via --pid-file
  setsid mariadbd --no-defaults --user=root --datadir="$D/db/data" \
    --socket="$D/db/mysql.sock" --port="$DBP" --bind-address=127.0.0.1 \
    --pid-file="$D/run/mariadbd.pid" --log-error="$D/log/mariadbd.log" \
    --innodb-buffer-pool-size=128M --innodb-lock-wait-timeout=900 \
    </dev/null >/dev/null 2>&1 &
  for i in $(seq 1 120); do
    mariadb-admin --no-defaults --socket="$D/db/mysql.sock" -uroot ping >/dev/null 2>&1 && break
    sleep 0.5
  done
  mariadb --no-defaults --socket="$D/db/mysql.sock" -uroot -e "
    CREATE USER 'slurm'@'127.0.0.1' IDENTIFIED BY 'slurm';
    CREATE USER 'slurm'@'localhost' IDENTIFIED BY 'slurm';
    GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
    GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';" || return 1
  # slurmdbd reads slurmdbd.conf from the directory of $SLURM_CONF; must be 0600
  cat > "$D/etc/slurmdbd.conf" <<EOF
AuthType=auth/munge
AuthInfo=socket=$D/munge/munge.sock
DbdHost=localhost
DbdPort=6819
SlurmUser=root
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DBP
StorageUser=slurm
StoragePass=slurm
StorageLoc=slurm_acct_db
PidFile=$D/run/slurmdbd.pid
LogFile=$D/log/slurmdbd.log
EOF
  chmod 600 "$D/etc/slurmdbd.conf"
  # clients/slurmctld -> slurmdbd use AccountingStoragePass as the munge socket
  # (AuthInfo is NOT used for that connection)
  sed -i -e '/^AccountingStorageType=/d' -e '/^JobAcctGatherType=/d' "$SLURM_CONF"
  cat >> "$SLURM_CONF" <<EOF
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=6819
AccountingStoragePass=$D/munge/munge.sock
JobAcctGatherType=jobacct_gather/linux
EOF
  slurmdbd || return 1                          # daemonizes, writes pid file
  for i in $(seq 1 60); do
    timeout 5 sacctmgr -n list cluster >/dev/null 2>&1 && return 0
    sleep 0.5
  done
  echo "slurmdbd did not come up" >&2; tail -n 20 "$D/log/slurmdbd.log" >&2
  return 1
}

# Wait for a job to finish (survives requeue); returns the job's exit code.
# Polls every 0.5 s (sbatch --wait polls with back-off: up to ~10-30 s late).
slurm_wait() {
  local jid=$1 timeout=${2:-3600} t=0 line st ec
  while :; do
    line=$(scontrol -o show job "$jid" 2>/dev/null)
    st=$(sed -n 's/.*JobState=\([A-Z_]*\).*/\1/p' <<<"$line")
    case $st in
      COMPLETED|FAILED|CANCELLED|TIMEOUT|NODE_FAIL|OUT_OF_MEMORY|PREEMPTED|BOOT_FAIL|DEADLINE)
        ec=$(sed -n 's/.* ExitCode=\([0-9]*\):\([0-9]*\).*/\1 \2/p' <<<"$line")
        set -- $ec
        [ "$st" = COMPLETED ] && return 0
        [ "${1:-0}" -ne 0 ] && return "$1"
        return $((128 + ${2:-1}));;
      "") echo "slurm_wait: job $jid unknown" >&2; return 255;;
    esac
    sleep 0.5; t=$((t + 1))
    [ $t -ge $((timeout * 2)) ] && { echo "slurm_wait: timeout ($st)" >&2; return 124; }
  done
}

slurm_down() {
  local D=$SLURM_CI_DIR p f i
  [ -f "$D/etc/slurm.conf" ] || return 0
  export SLURM_CONF="$D/etc/slurm.conf"
  p=$(cat "$D/run/slurmctld.pid" 2>/dev/null)
  if [ -n "$p" ] && [ "$(cat /proc/$p/comm 2>/dev/null)" = slurmctld ]; then
    scancel --full --user="$(id -un)" 2>/dev/null
    scontrol shutdown 2>/dev/null               # stops slurmctld and all slurmd
  fi
  # then anything still alive, in order: slurmd(s), slurmctld, slurmdbd, DB, munge
  for f in "$D"/run/slurmd-*.pid "$D/run/slurmctld.pid" "$D/run/slurmdbd.pid" \
           "$D/run/mariadbd.pid" "$D/munge/munged.pid"; do
    p=$(cat "$f" 2>/dev/null) || continue
    case $(cat "/proc/$p/comm" 2>/dev/null) in slurm*|munged|mariadbd) ;; *) continue;; esac
    kill "$p" 2>/dev/null
    for i in $(seq 1 60); do kill -0 "$p" 2>/dev/null || break; sleep 0.25; done
    kill -0 "$p" 2>/dev/null && kill -9 "$p" 2>/dev/null
  done
  return 0
}
