"""Integrations of lorakern with other libraries, one submodule each, imported explicitly:

    import lorakern.integrations.transformers   # transformers.Trainer: LoRA-One init callback, optimizer factory

Nothing here is imported by `import lorakern`, so lorakern never imports those libraries by itself.
"""
