"""The input pipeline's error, in a module of its own so that every data module can import it
(sources.py and tfrecord.py both raise it; neither imports the other for it)."""

TF_EXTRA = "pip install -r requirements-tf.txt (or sjmae-jax[tf])"


class DataError(ValueError):
  """Bad input data or data config; the message is one line naming the file / key / value."""
