"""ds-cl's projector inside other people's training loops (`hf_trainer`: Hugging Face `Trainer`, TRL).

Nothing here is imported by `import ds_cl`: each module imports its framework itself.
"""
