"""`python -m peft_tglora.tasks`: print the head parameter comparison with MTLoRA's head (see `heads.py`)."""

from .heads import main


main()
