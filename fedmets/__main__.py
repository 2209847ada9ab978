from fedmets.cli import app

app()
