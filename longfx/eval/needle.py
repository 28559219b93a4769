NAME = "needle"

def units(ctx):
    return 1

def run(ctx, model):
    raise NotImplementedError
