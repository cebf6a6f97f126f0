"""Write notebooks/S5.ipynb (without outputs) from the cells below: python scripts/make_notebook.py"""
import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

cells = [
    new_markdown_cell("# S5: the seed's MNIST network with trainkit\n\n"
                      "The same steps as `trainkit train`, one at a time, with the package's Python API: "
                      "data, sample images, the network, training, plots.\n\n"
                      "Set `TRAINKIT_QUICK=1` for a quick look (the test suite does): the fast recipe on a subset, "
                      "about 98% after two epochs of 8,192 images."),
    new_code_cell("import os\n\n"
                  "from trainkit import RECIPES, ConsoleLogger, TrainConfig, build_experiment, reports, train\n\n"
                  "QUICK = os.environ.get('TRAINKIT_QUICK') == '1'\n"
                  "cfg = TrainConfig()  # the seed recipe: 20 epochs, batch 512, SGD 0.01/0.9, StepLR(15, 0.1)\n"
                  "if QUICK:  # the fast recipe (batch 64, one-cycle lr 0.1, 2 epochs) on 8,192 training, 500 test images\n"
                  "    cfg = cfg.replace(**RECIPES['fast'], limit_train=8192, limit_test=500)\n"
                  "cfg"),
    new_markdown_cell("## Data, augmented samples and the network\n"
                      "`build_experiment` makes every piece from the config: MNIST read once into uint8 tensors "
                      "(from `$TRAINKIT_DATA_DIR`, else `./data`), the batched augmentation (with p=0.1 a centre "
                      "zoom, then a rotation within ±15°), the model, optimizer and schedule."),
    new_code_cell("exp = build_experiment(cfg)\n"
                  "data = exp.data\n"
                  "print(data.name, tuple(data.train_images.shape), tuple(data.test_images.shape), data.mean, data.std)\n"
                  "reports.plot_samples(exp.train_loader, data.classes, data.mean, data.std);"),
    new_code_cell("reports.model_summary(exp.model, data.image_shape)"),
    new_markdown_cell("## Training\n`train` runs the loop and returns the history; the `ConsoleLogger` callback "
                      "prints the seed's lines. Any other callback (your own logger, `EMA`, `GradientClipping`, "
                      "`EarlyStopping`) goes in the same list."),
    new_code_cell("result = train(cfg, data=data, callbacks=[ConsoleLogger()], write=False)\n"
                  "history, model = result.history, result.run.model\n"
                  "print(f'Final test accuracy: {history[-1].test_acc:.2f}%')"),
    new_markdown_cell("## Results"),
    new_code_cell("reports.plot_history(history);\n"
                  "out, labels, losses, images = reports.predictions(model, result.run.test_loader, exp.device)\n"
                  "reports.plot_confusion(reports.confusion_matrix(out.argmax(1), labels, data.num_classes), data.classes);\n"
                  "reports.plot_mistakes(images, out, labels, losses, data.classes, data.mean, data.std);\n"
                  "print(reports.markdown_table(history))"),
]
nb = new_notebook(cells=cells, metadata={"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}})
nbformat.write(nb, "notebooks/S5.ipynb")
