"""A pre-training step (every task, adversarial, through the registered ``uniter_pretrain`` and the
free-AT engine with its per-task settings) on one process and on 2 gloo ranks. Spawned workers import
this module by name (pytest puts this folder on sys.path)."""
from __future__ import annotations

import os
from typing import Dict, List

import torch
from omegaconf import OmegaConf

from villa_plugin.adversarial import AdversarialConfig, FreeATEngine
from villa_plugin.tasks.pretrain.collate import itm_collate, mlm_collate, mrm_collate
from villa_plugin.tasks.pretrain.registered import UniterPretrain
from villa_dist_helpers import STRATEGY_CLASSES, init_worker, snapshot

TASKS = ("mlm", "mrfr", "mrckl", "itm")
CLS, SEP, MASK, VOCAB = 1, 2, 3, 40
NUM_EXAMPLES, WORLD = 4, 2
ENGINE = AdversarialConfig(adv_modality=("image", "text"), adv_steps=2, adv_lr_txt=0.3, adv_lr_img=0.3,
                           adv_kl_weight=1.5, formulation="exact")


def new_model() -> UniterPretrain:
    torch.manual_seed(0)
    model = UniterPretrain(OmegaConf.create({
        "uniter_config": "base", "dropout": 0.0,
        "architecture": {"vocab_size": VOCAB, "hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2,
                         "intermediate_size": 32},
        "adversarial": {"adv_training": True, "adv_tasks": list(TASKS), "consistency": {"mrfr": "mse"}},
    }))
    model.build()
    model.init_losses()
    return model


def examples() -> List[Dict]:
    """4 captions / images; every example has 2 masked tokens and 2 masked regions, so each rank's
    shard has as many as the other (the official per-rank means then average to the global mean)."""
    g = torch.Generator().manual_seed(3)
    out = []
    for i, (n_tok, nbb) in enumerate(((4, 3), (6, 5), (3, 4), (5, 3))):
        out.append({"id": i, "tokens": torch.randint(5, VOCAB, (n_tok,), generator=g).tolist(),
                    "img_feat": torch.rand(nbb, 2048, generator=g), "img_pos_feat": torch.rand(nbb, 7, generator=g),
                    "soft_labels": torch.softmax(3 * torch.randn(nbb, 1601, generator=g), -1)})
    return out


def task_batch(task: str, rows: List[Dict]):
    built = []
    for ex in rows:
        tokens, row = ex["tokens"], dict(ex)
        row["input_ids"] = [CLS] + tokens + [SEP]
        if task == "mlm":
            row["input_ids"] = [CLS, MASK, tokens[1], MASK] + tokens[3:] + [SEP]
            row["txt_labels"] = [-1, tokens[0], -1, tokens[2]] + [-1] * (len(tokens) - 3) + [-1]
        elif task in ("mrfr", "mrckl"):
            row["img_mask"] = torch.tensor([True, True] + [False] * (ex["img_feat"].size(0) - 2))
        else:  # examples 1 and 3 are negatives: the next example's image
            row["target"] = 1 - ex["id"] % 2
            if row["target"] == 0:
                other = rows[(rows.index(ex) + 1) % len(rows)] if len(rows) > 1 else ex
                row.update(img_feat=other["img_feat"], img_pos_feat=other["img_pos_feat"])
        built.append(row)
    batch = mlm_collate(built) if task == "mlm" else mrm_collate(built, task) if task != "itm" else itm_collate(built, True)
    batch.update(task=task, dataset_name="demo", dataset_type="train")
    return batch


def global_and_local(task: str, rank: int, world: int):
    """The global batch (for one process) or this rank's shard of it; ITM negatives are fixed globally."""
    rows = examples()
    if task == "itm":  # negatives drawn on the global batch, then sharded
        full = task_batch("itm", rows)
        if world == 1:
            return full
        per = NUM_EXAMPLES // world
        swapped = []
        for i, ex in enumerate(rows):
            row = dict(ex)
            if i % 2:
                other = rows[(i + 1) % len(rows)]
                row.update(img_feat=other["img_feat"], img_pos_feat=other["img_pos_feat"], id=i)
            swapped.append(row)
        local = swapped[rank * per:(rank + 1) * per]
        batch = itm_collate([dict(r, input_ids=[CLS] + r["tokens"] + [SEP], target=1 - r["id"] % 2) for r in local], True)
        batch.update(task="itm", dataset_name="demo", dataset_type="train")
        return batch
    per = NUM_EXAMPLES // world
    return task_batch(task, rows[rank * per:(rank + 1) * per])


def run(strategy_name: str, rank: int = 0, world: int = 1) -> List[Dict[str, torch.Tensor]]:
    """One SGD update per task; the full parameters after each."""
    config = OmegaConf.create({"training": {"precision": "fp32", "device": "cpu"}, "optimizer": {"enable_state_sharding": False},
                               "distributed": {"strategy": strategy_name, "backend": "gloo", "timeout_s": 60,
                                               "find_unused_parameters": True}})  # tasks use different heads
    strategy = STRATEGY_CLASSES[strategy_name](config, torch.device("cpu"))
    model, opt = strategy.wrap(new_model(), lambda groups: torch.optim.SGD(groups, lr=0.5))
    model.train()
    raw = strategy.unwrap(model)
    params = []
    for task in TASKS:
        batch = global_and_local(task, rank, world)
        engine_config, consistency = raw.task_adversarial(task, ENGINE)
        strategy.zero_grad(model, opt)
        FreeATEngine(engine_config).step(
            model, batch, backward=lambda loss, retain_graph=False: loss.backward(retain_graph=retain_graph),
            sync_context=lambda last: strategy.sync_context(model, last), is_last_micro_batch=True,
            kl_reduction=raw.kl_reduction, shapes=raw.perturbation_shapes(batch), consistency=consistency)
        opt.step()
        params.append(snapshot(strategy, model))
    return params


def worker(rank: int, world: int, workdir: str) -> None:
    init_worker(rank, world, workdir)
    results = {name: run(name, rank, world) for name in ("ddp", "fsdp2")}
    torch.save(results, os.path.join(workdir, f"pretrain_rank{rank}.pt"))
    from villa_plugin.distributed import launch

    launch.teardown()
