"""A registered model and one training batch of a task builder, built from ``mmf_run`` arguments."""
from villa_plugin.config.compose import build_config
from villa_plugin.registry import registry


def model_and_batch(argv, rows: int = 4):
    """``(model, batch)``: ``config.model`` built with its losses, and ``rows`` train examples of
    ``config.datasets[0]`` collated (the builder prepared first, e.g. its demo materialised)."""
    config = build_config(list(argv), load_plugins=False)
    model = registry.get_model_class(config.model)(config.model_config[config.model])
    model.build()
    model.init_losses()
    name = config.datasets[0]
    builder = registry.get_builder_class(name)(name, config.dataset_config[name])
    builder.prepare()
    dataset = builder.build_dataset("train")
    return model, dataset.collate([dataset[i] for i in range(rows)])
