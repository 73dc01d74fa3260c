"""`plots tsne`: two tiny runs' class-token features, embedded and drawn side by side."""

import shutil

import jax
import numpy as np
import pytest

from pyra_jax import optim
from pyra_jax.experiments import plots
from pyra_jax.training import loop
from pyra_jax.training import setup
from tests.helpers.cli import cli
from tests.helpers.data import require_offline_mnist
from tests.helpers.models import tiny_config

require_offline_mnist(module_level=True)
pytest.importorskip('sklearn')


def cfg(method):
  return tiny_config(f'method={method}', data=dict(eval_split='val200'),
                     eval_batch_size=64,  # 200 = 3 * 64 + 8: the last batch is padded.
                     num_epochs=1, warmup_epochs=0)


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  root = tmp_path_factory.mktemp('tsne_runs')
  out = {}
  for method in ('tome', 'pyra'):
    results = loop.train_and_evaluate(cfg(method), str(root / method))
    out[method] = (root / method, results)
  return out


def first_images(config, n):
  """The first n images and labels of the eval split, read batch by batch."""
  data = setup.get_data(config.data, config.data.eval_split, config.eval_batch_size,
                        image_size=config.model.image_size, train=False, seed=0)
  images, labels = [], []
  for batch in iter(data):
    keep = np.asarray(batch['mask'], bool)
    images.append(batch['image'][keep])
    labels.append(batch['label'][keep])
  return np.concatenate(images)[:n], np.concatenate(labels)[:n]


def test_tsne_command_embeds_each_runs_class_token_features(runs, tmp_path,
                                                            monkeypatch, capsys):
  seen = []
  real_embed = plots.embed_tsne

  def spy(features, perplexity, seed):
    seen.append(np.array(features))
    return real_embed(features, perplexity, seed)
  monkeypatch.setattr(plots, 'embed_tsne', spy)
  out = tmp_path / 'tsne.png'
  plots.main(['tsne', f'--workdir_a={runs["tome"][0]}', '--label_a=ToMe',
              f'--workdir_b={runs["pyra"][0]}', '--label_b=PYRA', f'--out={out}'])
  printed = capsys.readouterr().out
  png = out.read_bytes()
  assert png[:8] == b'\x89PNG\r\n\x1a\n' and len(png) > 20_000
  assert len(seen) == 2
  for label, (method, (workdir, results)), features in zip(
      ('ToMe', 'PYRA'), runs.items(), seen):
    config = cfg(method)
    assert features.shape == (200, config.model.width)  # Every val200 image once.
    # The title's accuracy is the training loop's own final evaluation.
    line, = [ln for ln in printed.splitlines() if ln.startswith(f'{label}: ')]
    assert f'{workdir} step 25, 200 images' in line
    assert f'top-1 {100 * results["final_accuracy"]:.2f}%' in line
    # The embedded points are the model's pre-head class tokens.
    run, trainable, _ = setup.restore_run(config, str(workdir))
    params = jax.device_get(optim.merge_params(trainable, run.frozen))
    images, _ = first_images(config, 64)
    direct, logits = jax.jit(lambda p, x: (
        run.model.apply({'params': p}, x, train=False, features=True),  # pylint: disable=cell-var-from-loop
        run.model.apply({'params': p}, x, train=False)))(params, images)  # pylint: disable=cell-var-from-loop
    np.testing.assert_allclose(features[:64], direct, rtol=1e-5, atol=1e-5)
    head = params['head']
    np.testing.assert_allclose(features[:64] @ head['kernel'] + head['bias'],
                               logits, rtol=1e-4, atol=1e-4)
  assert not np.allclose(seen[0], seen[1])  # Two different trained models.


def test_max_images_takes_the_first_images_of_the_split_in_order(runs):
  config = cfg('pyra')
  run, trainable, _ = setup.restore_run(config, str(runs['pyra'][0]))
  data = setup.get_data(config.data, 'val200', 64, image_size=32, train=False, seed=0)
  all_ = plots.class_token_features(run, trainable, data)
  some = plots.class_token_features(run, trainable, data, max_images=70)
  _, labels = first_images(config, 200)
  np.testing.assert_array_equal(all_['labels'], labels)
  assert some['features'].shape == (70, 32)
  np.testing.assert_array_equal(some['labels'], labels[:70])
  np.testing.assert_allclose(some['features'], all_['features'][:70], rtol=1e-6)
  # Accuracy over exactly these points: counted from the logits, as evaluate does.
  assert all_['accuracy'] == runs['pyra'][1]['final_accuracy']


def test_embedding_has_one_point_per_image_and_a_usable_perplexity():
  rng = np.random.default_rng(0)
  features = np.concatenate([rng.normal(0, 1, (6, 8)), rng.normal(20, 1, (6, 8))])
  xy, perplexity = plots.embed_tsne(features, perplexity=30.0)
  assert xy.shape == (12, 2) and np.isfinite(xy).all()
  assert perplexity == pytest.approx(11 / 3)  # < N, as t-SNE requires.
  # Two far-apart clusters stay apart: each point's nearest neighbour is in its own.
  d = np.linalg.norm(xy[:, None] - xy[None], axis=-1) + np.eye(12) * 1e9
  assert ((np.argmin(d, 1) < 6) == (np.arange(12) < 6)).all()


def tsne_cli(*args):
  return cli('tsne', *args, module='pyra_jax.experiments.plots')


def test_a_workdir_without_a_checkpoint_ends_in_one_sentence(runs, tmp_path):
  bare = tmp_path / 'no_checkpoint'
  bare.mkdir()
  shutil.copy(runs['tome'][0] / 'results.json', bare / 'results.json')
  code, _, err = tsne_cli(f'--workdir_a={bare}', f'--workdir_b={runs["pyra"][0]}',
                          f'--out={tmp_path / "x.png"}')
  assert code != 0 and 'Traceback' not in err
  assert err.strip().count('\n') == 0
  assert f'No checkpoints in {bare}' in err and '--mode=train' in err
  code, _, err = tsne_cli(f'--workdir_a={tmp_path / "nothing"}',
                          f'--workdir_b={runs["pyra"][0]}', f'--out={tmp_path / "x.png"}')
  assert code != 0 and 'Traceback' not in err
  assert err.strip().count('\n') == 0
  assert 'results.json is missing' in err and 'finished training run' in err
  assert not (tmp_path / 'x.png').exists()
  code, _, err = tsne_cli(f'--workdir_a={bare}', f'--workdir_b={bare}',
                          f'--out={tmp_path / "no_folder" / "x.png"}')
  assert code != 0 and err.strip().count('\n') == 0
  assert 'no_folder does not exist; create it' in err


def test_too_few_images_ends_in_one_sentence(runs, tmp_path):
  code, _, err = tsne_cli(f'--workdir_a={runs["tome"][0]}', f'--workdir_b={runs["pyra"][0]}',
                          f'--out={tmp_path / "x.png"}', '--max_images=3')
  assert code != 0 and 'Traceback' not in err and err.strip().count('\n') == 0
  assert '--max_images=3: give 0 (all) or at least 5 images' in err


def test_a_split_the_task_lacks_ends_in_one_sentence(runs, tmp_path, capsys):
  with pytest.raises(SystemExit) as e:
    plots.main(['tsne', f'--workdir_a={runs["tome"][0]}',
                f'--workdir_b={runs["pyra"][0]}', f'--out={tmp_path / "x.png"}',
                '--split=no_such_split'])
  message = capsys.readouterr().err
  assert e.value.code == 1
  assert message.startswith('Error: ') and 'no_such_split' in message
  assert '\n' not in message.strip()
  assert not (tmp_path / 'x.png').exists()
