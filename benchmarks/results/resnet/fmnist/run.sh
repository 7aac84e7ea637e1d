#!/bin/bash
# ResNet18 FROM SCRATCH on the Fashion-MNIST shirt benchmark (2000 train / 2000 test, 32 px):
# train 8 epochs, then for 2x and 3x fewer MACs (budget, rule sum): decompose (accuracy straight
# after), fine-tune 3 epochs, evaluate.  One folder per seed.
cd "$(dirname "$0")/../../.."
D=${1:-data/fashion-mnist-shirt}
OUT=${2:-runs/fmnist_resnet}
mkdir -p $OUT
for seed in 0 1 2; do
  S=$OUT/seed$seed; mkdir -p $S
  python main.py --train --arch resnet18 --weights none --image_size 32 --epochs 8 --batch_size 64 --workers 2 \
    --seed $seed --quiet --train_path $D/train --test_path $D/test --model $S/model > $S/train.log 2>&1
  for t in 2 3; do
    python main.py --decompose --fine_tune --eval --model $S/model --decomposed_model $S/d$t --target_macs $t \
      --epochs 3 --batch_size 64 --workers 2 --seed $seed --quiet --latency_repeats 3 \
      --train_path $D/train --test_path $D/test --json $S/eval$t.json > $S/d$t.log 2>&1
  done
  python main.py --eval --model $S/model --test_path $D/test --workers 2 --quiet --latency_repeats 3 --json $S/eval_original.json > $S/eval.log 2>&1
done
echo done > $OUT/DONE
