#!/bin/bash
# The full bench_video_speed.py run (~17 min on an H100) on the lent GPU, whose commands stop at
# 10 minutes: the first call installs the carried wheels, copies the repository (later calls
# re-sync the working tree under a running bench) and starts the bench detached; every call
# (`bash bench/gpu_background.sh SECONDS`) then waits up to SECONDS for it, prints the log's tail
# and copies the JSON and log to $OUT. Call again within the machine's idle timeout to keep it.
# GPU_TESTS=1 on the first call runs `pytest -m gpu tests/gpu` before the bench starts.
D=${D:-/tmp/vs2}
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
mkdir -p $D
if [ ! -f $D/started ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl .whl/test/*.whl .whl/gpu/*.whl 2>&1 | tail -2
  rm -rf /tmp/vsrepo && cp -r "$PWD" /tmp/vsrepo   # a private copy: later calls re-sync the working tree
  cd /tmp/vsrepo
  export PYTHONPATH=/tmp/site:/tmp/vsrepo/.whl/stubs:/tmp/vsrepo
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
  if [ -n "$GPU_TESTS" ]; then   # the gpu-marked tests first, alone on the GPU
    timeout 400 python3 -m pytest -m gpu tests/gpu -q -p no:cacheprovider > $D/gpu-tests.log 2>&1
    tail -3 $D/gpu-tests.log
  fi
  date -u > $D/started
  setsid nohup python3 bench/bench_video_speed.py --steps 3 --out $D > $D/log.txt 2>&1 < /dev/null &
  echo $! > $D/pid
  sleep 5
fi
W=${1:-0}
end=$(( $(date +%s) + W ))
while [ $(date +%s) -lt $end ]; do
  if ! kill -0 $(cat $D/pid) 2>/dev/null; then echo "bench exited"; break; fi
  sleep 10
done
grep -E "INFO bench|ERROR|Traceback|wrote|steps:|scene:" $D/log.txt | tail -15
tail -3 $D/log.txt
cp $D/*.json $D/log.txt $D/gpu-tests.log "$OUT"/ 2>/dev/null; ls "$OUT"
