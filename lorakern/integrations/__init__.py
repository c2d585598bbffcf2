"""Integrations of lorakern with other libraries, one submodule each:

    import lorakern.integrations.transformers   # transformers.Trainer: LoRA-One init callback, optimizer factory
    lorakern.accelerate(peft_model)              # lorakern.integrations.peft_accel: peft LoRA layers on lorakern's op

`import lorakern` imports none of those libraries: peft_accel imports peft when `accelerate` is first called.
"""
