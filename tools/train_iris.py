"""Trains the embedded `iris` model and prints its weights as TOML.

The weights in src/upstream/embedded/iris.toml were produced by

    python -m venv /tmp/iris && /tmp/iris/bin/pip install scikit-learn==1.7.2
    /tmp/iris/bin/python tools/train_iris.py > src/upstream/embedded/iris.toml

A multinomial logistic regression (lbfgs, C=1.0) on the 150 samples of Fisher's iris data set
as bundled with scikit-learn, on the raw features in centimetres (sepal length, sepal width,
petal length, petal width). Keel computes softmax(W x + b) with these numbers.
"""

import sklearn
from sklearn.datasets import load_iris
from sklearn.linear_model import LogisticRegression

data = load_iris()
model = LogisticRegression(max_iter=1000, C=1.0, random_state=0)
model.fit(data.data, data.target)

def floats(xs):
    return "[" + ", ".join(repr(float(x)) for x in xs) + "]"

print("# Logistic regression on Fisher's iris data set; see tools/train_iris.py.")
print(f"# scikit-learn {sklearn.__version__}, training accuracy {model.score(data.data, data.target):.4f}")
print('features = ["sepal_length_cm", "sepal_width_cm", "petal_length_cm", "petal_width_cm"]')
print("classes = [" + ", ".join(f'"{c}"' for c in data.target_names) + "]")
print("weights = [")
for row in model.coef_:
    print(f"  {floats(row)},")
print("]")
print(f"bias = {floats(model.intercept_)}")
print("# Reference predictions (probabilities), checked by Keel's tests:")
for i in (0, 50, 100, 77, 133):
    p = model.predict_proba(data.data[i : i + 1])[0]
    print(f"# {list(map(float, data.data[i]))} -> {data.target_names[p.argmax()]} {floats(p)}")
