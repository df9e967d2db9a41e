"""A registered model and training batches of a task builder, built from ``mmf_run`` arguments."""
from villa_plugin.config.compose import build_config
from villa_plugin.datasets.task_mixture import TaskMixture
from villa_plugin.registry import registry


def model_and_batches(argv, rows: int = 4):
    """``(model, batches)``: ``config.model`` built with its losses, and ``rows`` train examples of
    ``config.datasets[0]`` collated (the builder prepared first, e.g. its demo materialised): one
    batch, or one per task for a task mixture (pre-training)."""
    config = build_config(list(argv), load_plugins=False)
    model = registry.get_model_class(config.model)(config.model_config[config.model])
    model.build()
    model.init_losses()
    name = config.datasets[0]
    builder = registry.get_builder_class(name)(name, config.dataset_config[name])
    builder.prepare()
    dataset = builder.build_dataset("train")
    views = list(dataset.views.values()) if isinstance(dataset, TaskMixture) else [dataset]
    return model, [view.collate([view[i] for i in range(rows)]) for view in views]


def model_and_batch(argv, rows: int = 4):
    """``(model, batch)`` of a single-task builder (see :func:`model_and_batches`)."""
    model, batches = model_and_batches(argv, rows)
    assert len(batches) == 1, f"{len(batches)} task batches: use model_and_batches"
    return model, batches[0]
