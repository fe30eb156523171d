#!/usr/bin/env bash
# quality.py's gpu preset (400 kimg per arm at batch 128, 2000 samples) for several seeds on one GPU:
# the arms of every seed in a wave (hybrid and pure diffusion, or ARMS) train as parallel processes:
# at 32 px one process keeps the GPU mostly idle (its step is bound by kernel launches, RESULTS.md "GPU training
# throughput"); then each seed samples and scores. The prepare phase must have run already, on the
# CPU machine, under ROOT/qSEED (its extractor and held-out split are then the CPU-trained ones).
#
#   bash benchmarks/quality_gpu.sh ROOT DEADLINE_S WAVE [WAVE...]     # a WAVE is "0,1,2"
#   PRESET=smoke DEVICE=cpu EXTRA="--kimg 0.1" bash benchmarks/quality_gpu.sh ROOT 600 0,1   # a dry run
#
# A later wave starts only if the last wave's time still fits before DEADLINE_S (seconds from the
# start): a fixed-kimg run stopped half-way would be worth nothing. Each seed's results.json,
# grids, logs and uint8 samples end in ROOT/seedSEED.tar (and are copied to COPY_TO when set).
set -u
root=$1 deadline_s=$2
shift 2
start_s=$SECONDS
wave_s=0
py=${PYTHON:-python3}
copy_to=${COPY_TO:+$(cd "$COPY_TO" && pwd)}  # absolute: the copy runs from inside each seed's folder
export OMP_NUM_THREADS=2  # ten processes on 16 cores; the GPU does the arithmetic
# e.g. ARMS=strong EXTRA="--arm strong:gan.adv_weight=1.0;gan.adv_t_max=300" (';' between an arm's overrides)
arms=${ARMS:-hybrid,diffusion}
# shellcheck disable=SC2206  # EXTRA is split into words on purpose
common=(--preset "${PRESET:-gpu}" --device "${DEVICE:-cuda}" --arms "$arms" --no-frd ${EXTRA:-})
for wave in "$@"; do
    if ((SECONDS - start_s + wave_s > deadline_s)); then
        echo "skip wave $wave: the last one took ${wave_s} s, ${deadline_s} s budget" && continue
    fi
    wave_start_s=$SECONDS
    seeds=${wave//,/ }
    for seed in $seeds; do
        for arm in ${arms//,/ }; do
            "$py" benchmarks/quality.py --phase _train_one --only "$arm" --seed "$seed" --out "$root/q$seed" \
                "${common[@]}" >"$root/q$seed/train-$arm.log" 2>&1 &
        done
    done
    wait
    for seed in $seeds; do  # sample and score the wave's seeds side by side, then print in order
        (
            "$py" benchmarks/quality.py --phase sample --seed "$seed" --out "$root/q$seed" "${common[@]}" &&
                "$py" benchmarks/quality.py --phase score --seed "$seed" --out "$root/q$seed" "${common[@]}"
            cd "$root/q$seed" && tar cf "../seed$seed.tar" ./*.log ./*.png ./samples-*.pt ./results.json
            if [[ -n $copy_to ]]; then cp "../seed$seed.tar" "$copy_to/"; fi  # as each seed ends: a timeout keeps it
        ) >"$root/q$seed/score.log" 2>&1 &
    done
    wait
    for seed in $seeds; do
        for log in "$root/q$seed"/train-*.log; do grep "step .*/" "$log" | tail -n 1; done
        grep -v Warning "$root/q$seed/score.log" | tail -n 7
    done
    wave_s=$((SECONDS - wave_start_s))
    echo "wave $wave: ${wave_s} s"
done
