"""The shared base of every pyra_jax config.

Every paper setting is a few lines on top of `get_base_config()`: pick a backbone,
a method, a merging schedule and a task. Every field is documented here, so
`python -m pyra_jax.main --config=configs/vitb_high.py --helpfull` lists them all
and a misspelt `--config.field=value` override is rejected by ml_collections.

Recipe defaults are the paper's (docs/algorithm.md §4): AdamW, lr 1e-3, weight decay
1e-4, 10 warm-up epochs then cosine to 1e-5, 100 epochs, batch 64, train on
train800val200 and test on the full test split.
"""

from __future__ import annotations

import ml_collections
from ml_collections.config_dict import placeholder


def get_base_config() -> ml_collections.ConfigDict:
  """Returns the ViT-B/16 + LoRA + PYRA (high) setting on VTAB-1k cifar100."""
  config = ml_collections.ConfigDict()
  config.seed = 0               # params init, data order, dropout: same seed, same run
                                # (a 64-bit signed integer, what jax.random takes)
  # 'paper': the method as the paper defines it (every default below) |
  # 'authors_code': every choice where the authors' code differs from the paper
  # set to the code's (docs/algorithm.md §8: lr_schedule, model.lora_init,
  # model.adapter_init, model.distilled_train/_eval, eval_epochs, headline,
  # distill.loss),
  # applied when a run starts (pyra_jax/recipe.py); a --config.<field> override
  # of one of those fields is refused: set the fields one by one instead.
  config.recipe = 'paper'

  # --- Model ---------------------------------------------------------------
  # Read by `pyra_jax.models.build_model`, and only here do the model's defaults
  # live (the modules have none). A field left unset (None) is taken from the
  # variant's table in pyra_jax/models/vit.py (width, depth, heads, mlp; the
  # patch size from the name) or from the task (num_classes); any field set
  # explicitly, e.g. --config.model.width=384, wins. Rates and probabilities
  # outside their range and counts with the wrong sign are refused by name
  # before anything is read (vit.MODEL_FIELDS; the loop's: training.checks.TRAIN_FIELDS).
  model = config.model = ml_collections.ConfigDict()
  model.variant = 'B/16'        # 'Ti/16', 'S/16', 'B/16', 'L/16', 'S/14', ...
  model.image_size = 224        # input resolution (square)
  model.num_classes = placeholder(int)  # unset: the task's number of classes
  model.width = placeholder(int)        # unset: from the variant
  model.depth = placeholder(int)        # unset: from the variant
  model.num_heads = placeholder(int)    # unset: from the variant
  model.mlp_dim = placeholder(int)      # unset: from the variant
  model.patch_size = placeholder(int)   # unset: from the variant name ('B/16' -> 16)
  model.qkv_bias = True         # biases on q/k/v (all the paper's backbones have them)
  model.layerscale = False      # DINOv2-style LayerScale after attention and MLP
  model.ln_eps = 1e-6           # the backbone's LayerNorm epsilon
  model.distilled = False       # DeiT: a distillation token at index 1 + a second head
  model.distilled_eval = 'cls'  # DeiT eval: 'cls' head only, or 'avg' of both heads
  model.distilled_train = 'as_eval'  # DeiT training logits: 'as_eval' (distilled_eval's)
                                     # | 'cls' | 'avg'; the authors' code trains 'cls'
                                     # and evaluates 'avg' (recipe=authors_code)
  model.drop_path = 0.1         # stochastic depth, linear 0 -> this over depth
  # What the head reads: 'cls' (the class token after the final LayerNorm) |
  # 'gap' (MAE's global_pool: the mean of the patch tokens, class token
  # excluded, through a LayerNorm of its own, `fc_norm`, initialised at 1/0;
  # the final LayerNorm is not applied). With merging the mean is weighted by
  # token size, so it stays the mean over the original patches (ToMe's MAE patch).
  model.pool = 'cls'
  model.head_init_std = 0.02    # truncated normal std of the re-initialised head
  # How attention is computed (same parameters, same result up to round-off):
  # 'einsum' (our matmuls, tuned and fastest on CPU) | 'dot_product_attention'
  # (jax.nn.dot_product_attention, which lets JAX choose the GPU/TPU kernel)
  model.attention = 'einsum'

  # LoRA on q/k/v (shared down A: D->h, up B: h->3D, no bias, no alpha scaling).
  model.lora_rank = 8           # 0 disables LoRA
  model.lora_dropout = 0.1      # dropout on LoRA's input, training only
  model.lora_init = 'zeros'     # 'zeros': B = 0 (LoRA starts as identity);
                                # 'trunc_normal': A, B ~ N(0, 0.02²) cut at ±2
                                # (timm's trunc_normal_), the authors' code as built

  # The trainable module (docs/algorithm.md §13-15; docs/methods.md "PEFT modules"):
  # 'lora' (above) | 'adapter' (the authors' bottleneck Adapter after the MLP,
  # Tables 18-19) | 'convpass' (3x3 convolutional bypasses beside attention and
  # the MLP, Jie & Deng 2022; Table 20) | 'fact' (FacT, Jie & Deng 2023) |
  # 'snf' (SNF, Wang et al. 2023). Any module but 'lora' turns LoRA off:
  # lora_rank and lora_dropout are then ignored. Each module's parameters live
  # under its own scope name, which config.trainable.lora_head matches.
  # Folding: LoRA and FacT fold into the frozen kernels; Adapter, Convpass and
  # SNF stay in the deployed model.
  model.peft = 'lora'
  model.peft_dim = 8            # bottleneck k of adapter / convpass (the authors':
                                # 8 ViT-B, 4 ViT-S, 12 ViT-L; Convpass's paper: 8)
  model.peft_dropout = 0.1      # dropout inside adapter / convpass, training only
                                # (0.1: both authors' code defaults)
  model.adapter_init = 'xavier'  # 'trunc_normal': kernels N(0, 0.02²) cut at ±2
                                 # absolute (timm), biases 0: the authors' model as
                                 # built (their init_weights overwrites the Adapter
                                 # class's init); the paper settings with
                                 # peft=adapter (Tables 18-19) use it | 'xavier':
                                 # Xavier kernels, biases N(0, 1e-6) (the class's own)
  model.convpass_scale = 1.0    # s, the bypasses' output scale (Convpass's per-task
                                # configs pick it from {0.01, 0.1, 1, 10, 100})
  model.convpass_init = 'identity'  # conv kernel: 'identity' on the centre tap (their
                                    # default) | 'xavier' (their choice on some tasks)
  # FacT (Jie & Deng, AAAI 2023): increments s·U Σ_i V of q/k/v/out and the
  # MLP's fc1/fc2 slices, U (D, r), V (r, D) shared by all layers; folds into
  # the frozen kernels for deployment.
  model.fact_variant = 'tt'     # 'tt': a learned (r, r) core per slice (FacT-TT);
                                # 'tk': cores from one (r, r, r) tensor and a
                                # (12L, r) factor (FacT-TK, Tucker)
  model.fact_rank = 8           # r (the FacT code's VTAB ranks: tt 8-16, tk 32)
  model.fact_scale = 1.0        # s (the FacT code tunes it per task: tt ~1-10, tk 0.1-1)
  model.fact_dropout = 0.1      # dropout on (x U) Σ_i, training only
  model.fact_tk_layout = 'paper'  # tk only, which core feeds which MLP slice:
                                  # 'paper': slice i gets Σ_c C[:,:,c]·P[i,c];
                                  # 'authors': the FacT code's reshape, each fc1/fc2
                                  # slice mixing all four cores (their published
                                  # numbers; the paper settings with peft=fact use it)
  # SNF (Wang et al., CVPR 2023): each shortcut x -> f(x), f = element-wise
  # affine then K planar flow steps; not foldable, stays in the deployed model.
  model.snf_flow_length = 0     # K; 0 is the paper's 0.036M parameters at ViT-B
                                # (the authors' code defaults to 16: 0.63M)
  model.snf_blocks = placeholder(int)  # SNF in the first N blocks only; unset: every
                                       # block (the authors' code: the first 12)

  # Token merging.
  model.method = 'pyra'         # 'peft' (no merging) | 'tome' | 'pyra' |
                                # 'evit' | 'tofu' | 'ats' | 'ltmp' | 'diffrate'
                                # (Table 14's competitors; docs/algorithm.md §16-17)
                                # | 'spvit' | 'rap' (Tables 2-5's competitors, §18:
                                # --mode=train runs their three stages)
  model.schedule = 'vitb_high'  # a named schedule, an int (ToMe constant r),
                                # 'r,inflection', 'flops:<ratio>', or 'r0,r1,...',
                                # or 'speedup:<x>[@<batch>]': the schedule whose
                                # speed-up measured on this device is closest to x
                                # from above (config.speedup; docs/performance.md)
  model.prop_attn = True        # add log(size) to the key logits
  # PYRA generator form (only for method='pyra'); the ablations of Tables 6-8:
  # 'pyra' | 'wr_only' | 'wd_only' | 'sigmoid_wr_only' | 'sigmoid_wd_only' |
  # 'no_sigmoid' | 'full_matrix' | 'mlp' (per token, D -> 4 -> D) | 'low_rank' (rank s)
  # (formulas: pyra_jax/models/pyra.py)
  model.modulation = 'pyra'
  model.modulation_rank = 1     # s, for modulation='low_rank' (Fig. 6)
  model.wr_init = 'uniform'     # 'uniform' U(-1, 1) (authors' code) | 'normal'
  model.pyra_ln_eps = 1e-5      # the generators' LayerNorm eps (PyTorch default)

  # The competing methods (Table 14; docs/algorithm.md §16). tofu and ats take
  # their per-layer counts from model.schedule (ats: N - r slots per layer).
  # EViT's layers, 0-based, comma-separated ('3,6,9'); '': EViT's own 3,6,9 of
  # 12 layers, scaled to the depth (24 layers: 6,12,18)
  model.evit_layers = ''
  model.evit_keep_rate = 0.7    # EViT: fraction of the tokens kept at each of its
                                # layers, in (0, 1) (0.7: EViT's own for ViT-B)
  model.evit_match_flops = False  # True: ignore evit_keep_rate and solve the keep
                                  # rate whose FLOPs match model.schedule's
  model.tofu_prune_layers = 3   # ToFu: the first N layers prune, later ones MLERP-merge
  # ATS: layers (0-based, '3,4,5') that also sample where model.schedule removes
  # nothing, with K = all their tokens (ATS's own setting: blocks 3-11 of 12,
  # schedule 'none'); '': sample only where the schedule removes tokens
  model.ats_layers = ''
  # LTMP (method='ltmp'): learned merge/prune thresholds per layer, straight-through
  # masks (hard forward, sigmoid((score - threshold) / tau) gradient); masked tokens
  # stay in the arrays (static shapes), so what runs costs full FLOPs.
  model.ltmp_tau = 0.5          # sigmoid temperature of the masks' gradient (0.5: the
                                # default of the method's training script; its model
                                # class defaults to 0.1)
  model.ltmp_merge_init = 0.9   # initial merge threshold (cosine similarity)
  model.ltmp_prune_init = 0.0   # initial prune threshold (mean attention received)
  model.ltmp_flops_target = 0.75  # FLOPs fraction (of uncompressed) the masks aim at
  model.ltmp_flops_weight = 10.0  # weight of (fraction - target)^2 in the loss
  # DiffRate (method='diffrate'): per-layer prune and merge kept counts found by
  # `--mode=search`, then fixed (static ints).
  model.diffrate_rates = ''     # the searched rates: <search workdir>/diffrate_rates.json,
                                # or inline 'p0,p1,...;m0,m1,...' (kept counts, class
                                # token included, one per layer)
  model.diffrate_search = False  # True: the search forward (set by --mode=search)
  model.diffrate_flops_ratio = 2.0  # search target: uncompressed / searched FLOPs
  model.diffrate_flops_weight = 100.0  # weight of (FLOPs fraction - 1/ratio)^2
  model.diffrate_flops_loss = 'ratio'  # the search's FLOPs term: 'ratio' = the line
                                # above; 'authors' = the method's code, 5 * (GFLOPs -
                                # target GFLOPs)^2, target at the ratio (~15x stronger
                                # on ViT-B/16; diffrate_flops_weight unused)
  model.diffrate_granularity = 4  # tokens between candidate kept counts (the method's)
  model.diffrate_search_epochs = 3  # epochs of --mode=search (the method's 3)
  # SPViT (method='spvit'): a learned token selector per pruning layer, the pruned
  # tokens packaged into one token; training masks (hard Gumbel-softmax), inference
  # keeps a static count per layer. Its layers, 0-based ('3,6,9'); '': the method's
  # 3,6,9 of 12 layers, scaled to the depth, or (when those cannot reach the
  # schedule's FLOPs: the high levels) the same spacing from block 0 ('0,3,6')
  model.spvit_layers = ''
  # Kept fraction of the patch tokens at each of its layers, decreasing, in (0, 1)
  # ('0.7,0.49,0.34'); '': base, base^2, ... with base solved so the deployed
  # model's FLOPs match model.schedule's (the setting's budget)
  model.spvit_keep_ratios = ''
  model.spvit_ratio_weight = 2.0  # weight of the keep-ratio loss (the method's 2.0)
  # RaP (method='rap'): attention heads and MLP units pruned per block, to the FLOPs
  # of model.schedule (the setting's budget), by a random search in stage 2.
  model.rap_widths = ''         # the pruned widths: <workdir>/stage2_prune/rap_widths.json
                                # (set by the pipeline), or inline 'h0,h1,...;m0,m1,...'
                                # (heads and MLP units kept per block); '': unpruned
  model.rap_candidates = 50     # random channel configurations the search scores
  model.rap_score_batches = 2   # training batches each candidate's loss is measured on
  # SPViT and RaP train in three stages (LoRA without compression, prune, retrain);
  # stage 1's workdir: '' = <workdir>/stage1_peft; or an earlier method='peft' run
  # of the same setting, reused as it is
  model.stage1_workdir = ''

  # --- Pretrained weights ---------------------------------------------------
  # Path to a checkpoint, a Hub name 'hf-hub:<owner>/<repo>[/<file>][@<rev>]'
  # (docs/usage.md, "Pretrained weights"), or 'random' for a random frozen backbone
  # (tests and smoke runs only). '' (not set) is refused with the commands to
  # fetch weights.
  config.model_init = ''
  config.model_init_format = 'auto'  # 'auto' | 'npz' | 'timm' | 'pyra_torch' |
                                     # 'dinov2_hf' | 'onnx_dinov2' | 'pyra_jax'
  # True: a model shallower than the checkpoint (model.depth) loads its first
  # model.depth blocks and the final norm, a smaller model of the same
  # pretraining; False: any depth mismatch is an error (usually a wrong variant).
  config.model_init_first_blocks = False

  # --- Data -----------------------------------------------------------------
  data = config.data = ml_collections.ConfigDict()
  # Where images come from: 'tfds' (a VTAB-1k task or any TFDS dataset) |
  # 'folder' (VTAB-1k split files <task>/<split>.txt of "<image path> <label>") |
  # 'imagefolder' (a class-per-folder tree <data_dir>/<split>/<class>/<image>, as
  # torchvision's ImageFolder; classes = sorted folder names) | 'mnist' (offline).
  # Arrays and tf.data datasets come in through pyra_jax.data.from_arrays /
  # from_tf_dataset.
  data.source = 'tfds'
  data.task = 'cifar100'        # a VTAB-1k task name (pyra_jax/data/tasks.py), or
                                # 'folder:NAME' for your own split-file folder
                                # <data_dir>/NAME (source=folder), or
                                # 'tfds:NAME[:VERSION]' for any TFDS dataset, e.g.
                                # tfds:oxford_flowers102 (source=tfds), or
                                # 'imagefolder:NAME' for the tree <data_dir>/NAME
                                # (source=imagefolder; any other task: data_dir itself)
  data.data_dir = ''            # TFDS data_dir, the VTAB-1k folder root, or the image tree
  # The splits: VTAB-1k names ('train800val200', 'train800', 'val200', 'test');
  # split file names for folder:NAME (train -> train.txt); TFDS split strings for
  # tfds:NAME ('train[:800]', 'test'); split folder names for imagefolder
  # (train_split='train', eval_split='test' read <data_dir>/train/, .../test/).
  data.train_split = 'train800val200'  # the split trained on (paper: all 1,000 images)
  data.eval_split = 'test'      # the split tested on: 'test' | 'val200' (VTAB-1k)
  data.image_key = 'image'      # tfds:NAME: the TFDS image feature (grey -> RGB)
  data.label_key = 'label'      # tfds:NAME: the TFDS ClassLabel feature (sets the classes)
  # imagefolder without split folders (<data_dir>/<class>/<image>): > 0 holds out
  # round(f * n) of each class's n images (at most n - 1) as split 'val', the rest
  # is split 'train' (Keras's validation_split, per class); 0: split folders.
  data.holdout_fraction = 0.0
  data.split_seed = 0           # imagefolder holdout: which images; not config.seed, so
                                # every run of a seed sweep tests on the same images
  data.normalization = 'imagenet'  # 'imagenet' mean/std | 'inception' ([-1, 1])
  data.shuffle_buffer = 1000    # tf.data shuffle buffer (>= split size: a full shuffle)
  # Training augmentation (none by default: the paper's VTAB-1k recipe). MAE's
  # fine-tuning (timm's create_transform): random_resized_crop=True, flip=True,
  # randaugment='rand-m9-mstd0.5-inc1', random_erasing=0.25. Deterministic per
  # seed and image position, so a resumed run sees the same images.
  data.random_resized_crop = False  # crop scale (0.08, 1), ratio (3/4, 4/3), bicubic
  data.flip = False             # random horizontal flip, probability 0.5
  data.randaugment = ''         # timm's RandAugment spec 'rand-m<M>[-n<N>][-mstd<S>][-inc1]'
                                # ('': off; pyra_jax/data/augment.py lists the ops)
  data.random_erasing = 0.0     # probability of erasing one box with normal noise
                                # (timm's RandomErasing, mode 'pixel')
  data.num_parallel_calls = -1  # -1: tf.data.AUTOTUNE

  # --- Optimisation -----------------------------------------------------------
  config.batch_size = 64        # global training batch (divided over devices)
  config.eval_batch_size = 64   # global eval batch; the last batch is padded and masked
                                # (larger than the eval split: the split in one batch)
  config.num_epochs = 100       # passes over the training split
  config.warmup_epochs = 10     # linear warm-up from warmup_init_lr, then cosine
  config.lr = 1e-3              # LoRA + head
  config.pyra_lr = -1.0         # PYRA generators; -1: same as lr (the code's behaviour)
  # DiffRate's rate logits during --mode=search (group 'diffrate'); -1: lr. The
  # method's 0.01 is for ~3,750 ImageNet steps; a VTAB-1k search has 30-100, and
  # Adam moves a logit at most ~lr per step (docs/methods.md, "LTMP").
  config.diffrate_lr = 0.1
  config.warmup_init_lr = 1e-6  # learning rate at step 0
  config.min_lr = 1e-5          # learning rate at the end of the cosine
  # 'per_step': linear warm-up, then cosine, updated at every step (docs/algorithm.md
  # §4) | 'authors': timm's cosine as the authors' train.py steps it: once per
  # epoch, one epoch late, the warm-up inside the cosine's span, warmup_init_lr and
  # min_lr the same for every group (docs/algorithm.md §8)
  config.lr_schedule = 'per_step'
  config.weight_decay = 1e-4    # kernels only (no biases, norms, 1-D params)
  config.b1 = 0.9               # AdamW beta1
  config.b2 = 0.999             # AdamW beta2
  config.eps = 1e-8             # AdamW epsilon
  config.grad_clip_norm = 0.0   # 0: off (paper)
  # Gradient accumulation: each update still sees batch_size images, as
  # grad_accum_steps micro-batches of batch_size / grad_accum_steps (summed in
  # the step; same update up to round-off); 1: off. For accelerators whose
  # memory cannot hold the paper's batch.
  config.grad_accum_steps = 1
  # Regexes over '/'-joined parameter paths; the first group that matches wins,
  # everything that matches none is frozen. Full fine-tuning (the config argument
  # finetune=full, configs/paper.py) adds trainable.backbone = '.*' after these
  # groups, so every parameter trains, and turns LoRA off.
  config.trainable = ml_collections.ConfigDict()
  config.trainable.pyra = r'.*/pyra/.*'  # PYRA generators + their LayerNorm (lr: pyra_lr)
  # The PEFT module (whichever model.peft selects: each lives under a scope of its
  # own name) and the head (lr: lr). The name stays `lora_head` for old runs.
  config.trainable.lora_head = r'(.*/(lora|adapter|convpass|fact|snf)/.*|^head.*)'
  config.trainable.ltmp = r'.*/ltmp/.*'  # LTMP's thresholds (lr: lr)
  config.trainable.diffrate = r'.*/diffrate/.*'  # DiffRate search logits (lr: diffrate_lr)
  config.trainable.spvit = r'.*/spvit/.*'  # SPViT's token selectors (lr: lr)
  # Layer-wise lr decay (MAE, BEiT): the update of a parameter in layer id
  # (patch embedding, class token, position embeddings: 0; block i: i + 1;
  # final norm and head: depth + 1) is scaled by layer_decay ** (depth + 1 - id).
  # 1: off. MAE fine-tunes ViT-B with 0.65, ViT-L with 0.75.
  config.layer_decay = 1.0
  # Label smoothing of the training targets: (1 - s) one-hot + s / classes.
  config.label_smoothing = 0.0
  # Mixup / CutMix on each training batch, as timm's `Mixup` in 'batch' mode
  # (MAE's fine-tuning: mixup 0.8, cutmix 1.0, switch 0.5, prob 1): with
  # probability `prob` the batch is mixed with its reverse, by CutMix with
  # probability `switch_prob` when both alphas are > 0, else Mixup; the mixing
  # weight is drawn from Beta(alpha, alpha) (CutMix: the box's area, and the
  # label weight is the area actually pasted). Labels are mixed the same way,
  # after label smoothing. Both alphas 0: off.
  mixup = config.mixup = ml_collections.ConfigDict()
  mixup.mixup_alpha = 0.0       # Mixup's Beta(alpha, alpha); 0: no Mixup (MAE: 0.8)
  mixup.cutmix_alpha = 0.0      # CutMix's Beta(alpha, alpha); 0: no CutMix (MAE: 1.0)
  mixup.prob = 1.0              # probability that a batch is mixed at all
  mixup.switch_prob = 0.5       # CutMix rather than Mixup, when both alphas are > 0

  # --- Distillation (PE-Dist, the paper's Table 15) ----------------------------
  # Train on CE + weight·T²·KL(softmax(teacher/T) || softmax(student/T)) towards a
  # frozen teacher, one of our trained models, run in eval mode inside the step
  # (docs/algorithm.md §10; docs/usage.md "PE-Dist"). Only for training: eval and
  # export of the student never load the teacher.
  distill = config.distill = ml_collections.ConfigDict()
  distill.enabled = False       # True: distil from the teacher below (the config
                                # argument teacher=... / teacher_export=... sets it)
  distill.teacher_workdir = ''  # a training workdir: its latest checkpoint, with
                                # the config stored in it (variant, LoRA, weights)
  distill.teacher_export = ''   # or an export (--mode=export, LoRA folded)
  distill.temperature = 1.0     # T; the paper gives none, T = 1 is its "CE + KL"
  distill.weight = 1.0          # w, the KL term's weight (0: cross-entropy only)
  distill.loss = 'kl'           # 'kl': CE + w·T²·KL above | 'authors_hard': the PYRA
                                # authors' code, ½·CE(labels) + ½·CE(the teacher's
                                # argmax), temperature and weight unused

  # --- Loop -------------------------------------------------------------------
  config.log_every_steps = 10   # metrics.jsonl / TensorBoard cadence
  config.eval_every_epochs = 10  # periodic test evals: after epoch 1, every N, and at
                                 # the end (paper: 11 of them); <= 0: only at the end
  config.eval_epochs = 'ours'   # which: 'ours' (after epochs 1, N, 2N, ..., the last) |
                                # 'authors' (after epochs 1, N+1, 2N+1, ..., the last:
                                # their code's 0-based `epoch % N == 0`)
  config.headline = 'final'     # the accuracy reported first (the output, results.json,
                                # the vtab tables): 'final' (after the last epoch) |
                                # 'max' (the best periodic eval, what the authors' code reports)
  config.checkpoint_every_steps = 200  # Orbax checkpoint cadence (and one at the end)
  config.keep_checkpoints = 2   # how many recent good checkpoints stay (>= 1; the newest
                                # always stays; docs/reliability.md)
  config.benchmark_after_training = False  # time the deployed model vs uncompressed
  # model.schedule = 'speedup:<x>[@<batch>]': how the speed-ups are measured
  # (deployed models, random weights, paired with the uncompressed model in
  # the same rounds; batch: 8 on a CPU, 64 on an accelerator, unless '@<batch>').
  speedup = config.speedup = ml_collections.ConfigDict()
  speedup.rounds = 10           # timed rounds per measurement
  speedup.candidates = 6        # schedules timed per pass (the first pass spreads
                                # them over the family's FLOPs ratios)
  speedup.tolerance = 0.05      # the pick measures within [x, x * (1 + tolerance)],
                                # else the schedules in between are timed too (while
                                # the family has any)
  speedup.cache_dir = ''        # the user cache of measurements; '': $XDG_CACHE_HOME/
                                # pyra_jax (~/.cache/pyra_jax); the workdir keeps its own
  config.dtype = 'float32'       # compute dtype: 'float32' | 'bfloat16'

  # --- VTAB-1k protocol (`python -m pyra_jax.vtab`, docs/algorithm.md §11) ---
  vtab = config.vtab = ml_collections.ConfigDict()
  # The PYRA generators' lr values tried per task (train800 -> val200) before
  # the final run (train800val200 -> test); the paper's grid. MAE ViT-L
  # (configs/paper.py) tries {1e-6, 3e-6, 1e-5, 3e-5} instead.
  vtab.pyra_lr_grid = (1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3)
  # Which row of the paper's table (docs/algorithm.md §7) the summary prints
  # beside ours: a configs/paper.py backbone ('vitb', 'vitl', 'vitl_mae',
  # 'deitb', 'vits', 'deits'), set by the paper settings; '' (the demo, tiny
  # and own settings): no paper number.
  vtab.backbone = ''
  return config

